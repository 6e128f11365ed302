"""Dataset formats, one module each behind `DatasetFormat` (base.py): `imagefolder.py` (a folder per class),
`csv_manifest.py` (`path,label` rows), `webdataset.py` (tar shards, `braces.py` their patterns); `samples.py` is what
every format builds (`Dataset`, its items and rules). services/data/datasets.py holds the registry (`FORMATS`) and
reads a job's dataset through services/paths.py's rule.

Named "formats", not "sources": services/data/sources.py is where a training step's mini-batches come from (the
cache, images, the backbone online), a different thing. Torch-free.
"""
