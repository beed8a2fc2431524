"""``pneumoscan dicom pull``: screen a study held by a DICOMweb server, and with ``store`` send the results back.

QIDO-RS lists the study's instances, WADO-RS retrieves the image ones (the SOP classes the node screens), the
``Screener`` screens them in batches, and STOW-RS stores the SR and Secondary Capture in the same study. Results
made by pneumoscan itself are never screened again (the node's rule, ``screen.not_screened``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import PneumoscanError
from .screen import IMAGE_CLASSES, made_by_pneumoscan

log = logging.getLogger("pneumoscan.dicom")

SOP_CLASS, SERIES_UID, SOP_UID = "00080016", "0020000E", "00080018"


@dataclass
class Pulled:
    sop_instance_uid: str
    outcome: object  # screen.Outcome, or a str saying why it could not be screened
    stored: bool = False


def _value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _with_meta(ds):
    """WADO-RS datasets may come without file meta; pixel decoding needs their transfer syntax."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
    return ds


def pull(model, url: str, study_uid: str, *, store: bool = False, batch_size: int = 8,
         threshold: str | float = "screening", heatmaps: str = "positive", client=None) -> Iterator[Pulled]:
    """Screen every image instance of ``study_uid`` on the DICOMweb server at ``url``; one Pulled each."""
    from .screen import Screener

    if client is None:
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(url)
    screener = Screener(model, threshold=threshold, heatmaps=heatmaps)
    try:
        listed = client.search_for_instances(study_instance_uid=study_uid, get_remaining=True)
    except Exception as exc:  # requests' HTTP and connection errors
        raise PneumoscanError(f"{url}: cannot search study {study_uid} (QIDO-RS: {_short(exc)})") from None
    if not listed:
        raise PneumoscanError(f"{url}: study {study_uid} has no instances (or is not there)")
    images = [i for i in listed if _value(i, SOP_CLASS) in IMAGE_CLASSES]
    skipped = len(listed) - len(images)
    if skipped:
        log.info("study %s: %d instance(s) that are no image the node screens (SR, presentation states, ...) "
                 "left out", study_uid, skipped)
    for start in range(0, len(images), batch_size):
        items, headers = [], []
        for item in images[start:start + batch_size]:
            sop = _value(item, SOP_UID)
            try:
                ds = client.retrieve_instance(study_uid, _value(item, SERIES_UID), sop)
            except Exception as exc:
                yield Pulled(sop, f"{sop}: cannot retrieve (WADO-RS: {_short(exc)})")
                continue
            if made_by_pneumoscan(ds):
                continue  # our own Secondary Capture from an earlier run
            items.append((sop, _with_meta(ds)))  # screened as retrieved: no second encoding and parse
            headers.append(sop)
        for sop, outcome in zip(headers, screener.screen(items), strict=True):
            pulled = Pulled(sop, outcome.unanswerable or outcome)
            if store and not isinstance(outcome, str) and outcome.results:
                try:
                    client.store_instances(outcome.results, study_instance_uid=study_uid)
                    pulled.stored = True
                except Exception as exc:
                    raise PneumoscanError(f"{url}: cannot store results for {sop} (STOW-RS: {_short(exc)})") from None
            yield pulled


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
