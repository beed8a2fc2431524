"""pneumoscan at the hospital: DICOM in, DICOM results out.

Operators with one job each (in the spirit of MONAI Deploy):

- ``spool``: received instances and results waiting for delivery, written safely (temp name, fsync, rename);
- ``results``: the TID 1500 Structured Report and the Grad-CAM Secondary Capture for one screened instance;
- ``screen``: the pipeline stage (``pipeline.prepare`` per instance, ``pipeline.decide`` per batch) around one
  parse per instance, the heatmap rule, and the rule for what is never screened (no image, pneumoscan's own);
- ``node``: the pynetdicom Storage SCP (``pneumoscan dicom listen``) and its screening worker, wiring:
- ``access``: who may send (the allow-list, DICOM TLS) and the one log record per association;
- ``forward``: the forwarder to ``--forward``, each result on its own backoff;
- ``observe``: the results log the drift monitor reads and ``/metrics`` with its gauges;
- ``pull``: DICOMweb (QIDO-RS / WADO-RS, STOW-RS back) for ``pneumoscan dicom pull``;
- ``predict_out``: the SR and SC of ``pneumoscan predict --dicom-out``;
- the command line, ``pneumoscan dicom``, is in ``pneumoscan.cli.dicom``.

Nothing here decodes pixels or judges an image itself: ``pneumoscan.pipeline`` does.
"""
