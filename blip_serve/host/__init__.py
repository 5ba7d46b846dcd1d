"""Everything that touches BentoML's, uvicorn's or circus's internals, behind one version gate
(versions.py): patches, the drain, the home lock, the runner map and the model side's disconnects."""
