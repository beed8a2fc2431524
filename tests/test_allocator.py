"""The process-wide allocator settings (pneumoscan.allocator): large tensors reuse memory instead of faulting it in.

Each case runs in a fresh interpreter, because the settings are process-wide and PyTorch reads its huge-page switch
once, when it first allocates.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
from pneumoscan import allocator
applied = allocator.tune()
import torch
x = torch.ones((64 << 20) // 4)           # 64 MiB, over glibc's largest mmap threshold (32 MiB)
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    y = torch.ones((64 << 20) // 4)       # fills every page
    del y
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(**env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_", "PNEUMOSCAN_ALLOC"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**environment, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


glibc = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                           reason="mallopt is glibc's")


@glibc
def test_tuned_process_reuses_large_tensor_memory_without_page_faults():
    tuned = _probe()
    default = _probe(PNEUMOSCAN_ALLOCATOR="default")
    assert tuned["applied"] == {"huge_pages": True, "heap_reuse": True}
    assert default["applied"] == {"huge_pages": False, "heap_reuse": False}
    # glibc's default mmaps each 64 MiB tensor afresh: 16,384 page faults per tensor with 4 KiB pages
    assert default["faults"] > 5 * 10_000
    assert tuned["faults"] < 5_000  # measured: ~550 (the interpreter itself)


@glibc
def test_users_own_malloc_settings_are_left_alone():
    result = _probe(MALLOC_MMAP_MAX_="65536", THP_MEM_ALLOC_ENABLE="0")
    assert result["applied"] == {"huge_pages": False, "heap_reuse": False}
    assert result["faults"] > 5 * 10_000


def test_huge_pages_are_not_claimed_once_torch_is_loaded():
    code = ("import torch, json; from pneumoscan import allocator; "
            "print(json.dumps(allocator.tune()['huge_pages']))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THP_", "PNEUMOSCAN_ALLOC"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "false"


def test_command_line_runs_with_the_settings(tmp_path):
    code = ("import sys, json; from pneumoscan import cli, allocator; code = cli.main(['keys', 'list', '--file', "
            f"{str(tmp_path / 'keys.json')!r}]); print(json.dumps(allocator.tune()))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_", "PNEUMOSCAN_ALLOC"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    applied = json.loads(out.stdout.strip().splitlines()[-1])
    assert applied["huge_pages"] is True
