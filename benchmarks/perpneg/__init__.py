"""The parts of ``benchmarks/bench_perpneg.py`` (run that script; see its docstring).

* :mod:`.cameras`: threestudio's random-camera sampler, camera matrices, the 4·B conditioning;
* :mod:`.models`: the random / tiny / pretrained UNets and their prompt banks;
* :mod:`.counting`: part (a), UNet branches per step over the camera distribution;
* :mod:`.timing`: part (b), wall time of one guidance step per method;
* :mod:`.report`: the printed tables of part (b);
* :mod:`.cli`: the options and ``main``.
"""
