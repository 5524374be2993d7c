"""threestudio adapters: importing this module registers the ``perpneg-*`` classes.

Registered names:

* ``perpneg-prompt-processor`` — :class:`~.prompt_processor.PerpNegPromptProcessor`
* ``perpneg-deepfloyd-prompt-processor`` — :class:`~.deepfloyd.PerpNegDeepFloydPromptProcessor`
* ``perpneg-deep-floyd-guidance`` — :class:`~.deepfloyd.PerpNegDeepFloydGuidance`
* ``perpneg-stable-diffusion-guidance`` — :class:`~.guidance.PerpNegStableDiffusionGuidance`
* ``perpneg-stable-diffusion-vsd-guidance`` — :class:`~.vsd.PerpNegStableDiffusionVSDGuidance`
* ``perpneg-stable-diffusion-sdi-guidance`` — :class:`~.sdi.PerpNegStableDiffusionSDIGuidance`
"""

from .deepfloyd import PerpNegDeepFloydGuidance, PerpNegDeepFloydPromptProcessor
from .guidance import PerpNegStableDiffusionGuidance
from .prompt_processor import PerpNegPromptProcessor, PerpNegPromptProcessorOutput
from .sdi import PerpNegStableDiffusionSDIGuidance
from .vsd import PerpNegStableDiffusionVSDGuidance

__all__ = [
    "PerpNegDeepFloydGuidance",
    "PerpNegDeepFloydPromptProcessor",
    "PerpNegPromptProcessor",
    "PerpNegPromptProcessorOutput",
    "PerpNegStableDiffusionGuidance",
    "PerpNegStableDiffusionSDIGuidance",
    "PerpNegStableDiffusionVSDGuidance",
]
