"""threestudio adapters: importing this module registers the ``perpneg-*`` classes.

Registered names:

* ``perpneg-prompt-processor`` — :class:`~.prompt_processor.PerpNegPromptProcessor`
* ``perpneg-stable-diffusion-guidance`` — :class:`~.guidance.PerpNegStableDiffusionGuidance`
"""

from .guidance import PerpNegStableDiffusionGuidance
from .prompt_processor import PerpNegPromptProcessor, PerpNegPromptProcessorOutput

__all__ = [
    "PerpNegPromptProcessor",
    "PerpNegPromptProcessorOutput",
    "PerpNegStableDiffusionGuidance",
]
