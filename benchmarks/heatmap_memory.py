"""Peak memory and time of a Grad-CAM heatmap for one very large valid image (issue 14, item 4).

Writes a 7000 x 7000 grayscale PNG (a real test X-ray upscaled; about 2 MiB, under both the 50 MP and the 20 MiB
limits) to a temporary folder, then, each in a fresh process so that peak RSS is that route's own:
  cli     the route of `pneumoscan predict --heatmaps`: Model.predict, then explain.save_heatmap
  server  POST /v1/predict?heatmap=true&heatmaps=all to a real server on a socket (serve_in_thread)

Only names both the old and the new code have are used, so the same script measures a checkout before the fix:
    python benchmarks/heatmap_memory.py
    git worktree add /tmp/old 184cb07 && PYTHONPATH=/tmp/old/src python benchmarks/heatmap_memory.py
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"
SOURCE = DATA / "test" / "PNEUMONIA" / "person1_virus_6.jpeg"


def make_image(folder: Path, side: int) -> Path:
    from PIL import Image

    path = folder / f"big{side}.png"
    with Image.open(SOURCE) as image:
        image.convert("L").resize((side, side), Image.Resampling.BILINEAR).save(path, compress_level=9)
    return path


def run_route(route: str, image: Path, out: Path) -> None:
    """Child process: screen ``image`` with a heatmap through ``route``, print seconds and peak RSS."""
    from pneumoscan import load_model

    model = load_model(precision="float32")
    start = time.perf_counter()
    if route == "cli":
        from pneumoscan.explain import save_heatmap

        status = model.predict(image).status
        save_heatmap(model, image, out)
    else:
        import httpx

        from pneumoscan.serve import create_app, serve_in_thread

        with serve_in_thread(create_app(model)) as url:
            response = httpx.post(f"{url}/v1/predict", params={"heatmap": "true", "heatmaps": "all"},
                                  files={"file": (image.name, image.read_bytes())}, timeout=600)
            status = f"HTTP {response.status_code} {response.json().get('status')}"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"{route:<7} {status:<18} {seconds:6.1f} s   peak RSS {peak:5.2f} GiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=7000, help="image side in pixels (default 7000: 49 MP)")
    parser.add_argument("--route", choices=["cli", "server"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.route:
        with tempfile.TemporaryDirectory() as out:
            run_route(args.route, Path(args.image), Path(out))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        image = make_image(Path(folder), args.side)
        print(f"{image.name}: {args.side}x{args.side} px, {image.stat().st_size / 2**20:.1f} MiB; one heatmap each")
        for route in ("cli", "server"):
            subprocess.run([sys.executable, __file__, "--route", route, "--image", str(image)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
