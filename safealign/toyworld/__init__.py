"""The embedded toy world: vocabulary and drawing (``world``), exact pixel detectors (``detect``), its params
section (``settings``), the `grammar` prompt backend (``grammar``), the toy family's pretraining and base metrics
(``pretrain``), and its judge (``judge``) and quality metric (``quality``) for evaluation. Each plugs into a
generic registry; no generic module names the toy."""
