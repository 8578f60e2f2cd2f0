"""`lmm data inspect` on a LLaVA-style JSON whose images are not where it looks: it names the path and the fix."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner


def test_inspect_names_the_missing_image_path_and_suggests_image_root(tmp_path, monkeypatch):
    from lmm.cli import app

    (tmp_path / "data" / "imgs").mkdir(parents=True)
    records = []
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "data" / "imgs" / f"{i}.png")
        records.append(
            {
                "id": str(i),
                "image": f"imgs/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": f"thing {i}"},
                ],
            }
        )
    data = tmp_path / "data" / "train.json"
    data.write_text(json.dumps(records))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths now resolve against a folder without the images

    result = CliRunner().invoke(app, ["data", "inspect", str(data), "--format", "conversation"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "usable: 0" in out and "missing_image: 3" in out
    assert "imgs/0.png does not exist" in out  # the path it looked for
    assert "--image-root" in out and str(elsewhere) in out  # where it looked, and the fix

    fixed = CliRunner().invoke(
        app, ["data", "inspect", str(data), "--format", "conversation", "--image-root", str(tmp_path / "data")]
    )
    assert fixed.exit_code == 0, fixed.output
    assert "usable: 3" in fixed.output and "missing_image" not in fixed.output and "hint" not in fixed.output
