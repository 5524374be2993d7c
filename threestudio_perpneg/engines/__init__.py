"""Score-distillation engines, one module per prior; no threestudio imports (of the package only
:mod:`threestudio_perpneg.core` and :mod:`threestudio_perpneg.common`).

* :mod:`.sd`: Stable Diffusion (latent space) SDS/SJC step, model loading, loss normalisation.
* :mod:`.pixel`: pixel-space priors (DeepFloyd IF stage I; UNets with or without learned variance).
* :mod:`.vsd`: variational score distillation (ProlificDreamer) with our LoRA processor.
"""
