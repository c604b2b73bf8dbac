"""Print README's "Reproducing the published numbers" table from the weights metadata (intern2.weights).

    python tools/published_table.py

One row per published figure of a pretrained tag: the figure, its protocol, and the `intern2 eval` command that
runs that protocol on the official file and the dataset in its usual layout (paths under /data are placeholders).
tests/test_readme.py checks that README.md holds exactly this table and that every command parses.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from intern2.weights import get_weights, list_pretrained  # noqa: E402

# Where each dataset's evaluation split sits in the layout intern2 reads (README "Training on your own data").
DATA = {"ImageNet-1k val": ["--data", "/data/imagenet/val"],
        "ADE20K val": ["--data", "/data/ADEChallengeData2016", "--split", "validation"],
        "COCO val2017": ["--data", "/data/coco", "--split", "val2017"],
        "Kinetics-400 val": ["--data", "/data/kinetics400/val.txt"],
        "Kinetics-710 val": ["--data", "/data/kinetics710/val.txt"],
        "Something-Something v2 val": ["--data", "/data/ssv2/val.txt"]}
FLORES = ["--data", "flores:/data/flores200_dataset", "--src", "eng_Latn", "--tgt", "fra_Latn"]


def rows() -> List[Tuple[str, str, str, List[str]]]:
    """(tag, published figures, protocol, intern2 argv) for every protocol of a tag whose figures intern2's eval
    reproduces (figures of one protocol, e.g. box and mask AP, share a row)."""
    out = []
    for name in list_pretrained():
        weights = get_weights(*name.split(".", 1))
        if weights.task == "translation":
            out.append((name, "chrF++ per direction (NLLB's metrics.csv)", f"beam {weights.protocol.num_beams}",
                        ["eval", "translation", "--checkpoint", weights.file, *FLORES]))
        protocols = {}
        for metric in weights.metrics:
            if metric.dataset in DATA:  # not video-text zero-shot: published with merged weights (see the metric)
                protocols.setdefault((metric.dataset, metric.protocol), []).append(f"{metric.name} {metric.value}")
        for (dataset, protocol), figures in protocols.items():
            argv = ["eval", "--model", name, "--checkpoint", Path(weights.file).name, *DATA[dataset]]
            if "multi-scale" in protocol:
                argv.append("--tta")
            out.append((name, f"{', '.join(figures)} ({dataset})", protocol, argv))
    return out


def table() -> str:
    lines = ["| tag | published | protocol | command |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {figure} | {protocol} | `intern2 {shlex.join(argv)}` |"
              for name, figure, protocol, argv in rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
