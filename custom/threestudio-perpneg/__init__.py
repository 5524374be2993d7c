import threestudio_perpneg.adapters  # noqa: F401  (registers the perpneg-* classes)
