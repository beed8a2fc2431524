"""pneumoscan at the hospital: DICOM in, DICOM results out.

Operators with one job each (in the spirit of MONAI Deploy):

- ``spool``: received instances and results waiting for delivery, written safely (temp name, fsync, rename);
- ``results``: the highdicom Structured Report and the Grad-CAM Secondary Capture for one screened instance;
- ``screen``: decode -> prepare -> ``Model.score`` (batched) -> ``Model.result`` -> results, through the core API;
- ``node``: the pynetdicom Storage SCP (``pneumoscan dicom listen``), a screening worker and a forwarding worker;
- ``pull``: DICOMweb (QIDO-RS / WADO-RS, STOW-RS back) for ``pneumoscan dicom pull``;
- the command line, ``pneumoscan dicom``, is in ``pneumoscan.cli.dicom``.

Nothing here decodes pixels or judges an image itself: ``pneumoscan.data.images.decode`` and ``Model`` do.
"""
