"""pytest fixtures of the threestudio tier (:mod:`.fixtures`).

The CPU harness itself (stand-ins, nerfacc doubles, the system builder) lives in the package:
:mod:`threestudio_perpneg.threestudio_cpu`.
"""
