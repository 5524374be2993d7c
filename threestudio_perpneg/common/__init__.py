"""Input checks and small shared helpers used by every command and library entry point.

Pure (imports only the standard library; numpy/torch values are handled duck-typed), so any layer
may import it:

* :mod:`.checks`: numbers in range, booleans, names and choices, seeds and seed ranges
  (``"0-7,9"``), slugs. Every check raises ``ValueError`` (or the ``error`` class given) with one
  line naming the key, the value and what was expected.
* :mod:`.io`: atomic text / bytes / JSON / image writes (temporary sibling, then ``os.replace``)
  and JSON conversion of numpy, torch and ``Path`` values.
"""
