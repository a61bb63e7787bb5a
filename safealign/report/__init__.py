"""The `report` stage's page: one self-contained HTML file (``report/index.html``) a person reads.

``page.py`` holds the pure parts (flattening metrics, reading ``dvc exp show --json``, HTML escaping and tables);
``build.py`` gathers the pipeline's metrics, plots and training logs into the page, every image inlined as a
data URI so that the file needs no network and no other file.
"""
