"""`lmm chat` through a pseudo-terminal (pexpect): attach, ask, follow up, /save, /reset, @mentions, Ctrl-C,
/quit; and the non-interactive --prompt mode. Answers equal `model.chat` on the same saved model."""

import json
import signal
import sys
from pathlib import Path

import pytest
from PIL import Image

pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed")

LMM_BIN = str(Path(sys.executable).with_name("lmm"))
MAX_NEW = 12
PROMPT = "you> "


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from lmm.testing import saved_tiny_chat_model

    d = tmp_path_factory.mktemp("chat")
    model, _, image = saved_tiny_chat_model(d, "shape.png")
    with Image.open(image) as im:
        pil = im.convert("RGB")
    return model, d, image, pil


def user(pil, text):
    return {"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": text}]}


def test_interactive_session_in_a_pty(saved, tmp_path):
    model, d, image, pil = saved
    ask = lambda conv: model.chat(conv, max_new_tokens=MAX_NEW)
    conv1 = [user(pil, "what is this?")]
    want1 = ask(conv1)
    conv2 = conv1 + [
        {"role": "assistant", "content": want1},
        {"role": "user", "content": [{"type": "text", "text": "and the color?"}]},
    ]
    want2 = ask(conv2)
    assert want1 and want2 and want1.isprintable() and want2.isprintable()
    assert want1 != ask([{"role": "user", "content": "what is this?"}]), "the answer should depend on the image"

    # SIGINT back to default in the child: a test run launched in the background (`cmd &` in a script) starts
    # with SIGINT ignored, which the chat would inherit, and then Ctrl-C could not reach it
    child = pexpect.spawn(
        LMM_BIN,
        ["chat", "--model", str(d / "model"), "--max-new-tokens", str(MAX_NEW), "--device", "cpu"],
        cwd=str(tmp_path),
        encoding="utf-8",
        timeout=120,
        dimensions=(50, 400),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        child.expect_exact(PROMPT, timeout=180)
        child.sendline("/help")
        child.expect_exact("/image PATH")
        child.expect_exact(PROMPT)

        child.sendline(f"/image {image}")
        child.expect_exact("attached")
        child.expect_exact(PROMPT)
        child.sendline("what is this?")
        child.expect_exact("assistant> ")
        child.expect_exact(want1 + "\r\n")
        child.expect_exact(PROMPT)

        child.sendline("and the color?")  # history keeps the first image
        child.expect_exact("assistant> ")
        child.expect_exact(want2 + "\r\n")
        child.expect_exact(PROMPT)

        child.sendline("/save conv.json")
        child.expect_exact("saved 4 message(s)")
        child.expect_exact(PROMPT)
        saved_conv = json.loads((tmp_path / "conv.json").read_text())
        assert saved_conv[0]["content"][0] == {"type": "image", "image": str(image)}
        assert [m["role"] for m in saved_conv] == ["user", "assistant", "user", "assistant"]
        assert saved_conv[3]["content"] == want2
        assert model.chat(saved_conv[:3], max_new_tokens=MAX_NEW) == want2  # the file reloads as a conversation

        child.sendline("/reset")
        child.expect_exact("conversation cleared")
        child.expect_exact(PROMPT)
        child.sendline(f"@{image} what is this?")  # an @mention attaches too; after /reset, no old history
        child.expect_exact("assistant> ")
        child.expect_exact(want1 + "\r\n")
        child.expect_exact(PROMPT)

        child.sendline("/image missing.png")
        child.expect_exact("error: image not found")
        child.expect_exact(PROMPT)

        # Ctrl-C stops a long answer, the session goes on (4,000 tokens: seconds of streaming, so the interrupt
        # lands mid-answer however fast the machine)
        child.sendline("/set max_new_tokens 4000")
        child.expect_exact("max_new_tokens = 4000")
        child.expect_exact(PROMPT)
        child.sendline("tell me more")
        child.expect_exact("assistant> ")
        long_start = ask(
            conv1
            + [
                {"role": "assistant", "content": want1},
                {"role": "user", "content": [{"type": "text", "text": "tell me more"}]},
            ]
        )
        child.expect_exact(long_start[:2])  # the answer is streaming ...
        child.sendintr()  # ... and Ctrl-C stops it
        child.expect_exact("[interrupted]")
        child.expect_exact(PROMPT)
        child.sendintr()  # Ctrl-C at the prompt does not leave either
        child.expect_exact("/quit or Ctrl-D leaves")
        child.expect_exact(PROMPT)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def run_cli(*args: str):
    """The real `lmm` typer app, in this process (no interpreter start-up to pay)."""
    from typer.testing import CliRunner

    from lmm.cli import app

    return CliRunner().invoke(app, list(args))


def test_one_shot_prompt_prints_the_answer_and_exits(saved):
    model, d, image, pil = saved
    want = model.chat([user(pil, "what is this?")], max_new_tokens=MAX_NEW)
    out = run_cli(
        "chat",
        "--model",
        str(d / "model"),
        "--image",
        str(image),
        "--prompt",
        "what is this?",
        "--max-new-tokens",
        str(MAX_NEW),
        "--device",
        "cpu",
    )
    assert out.exit_code == 0, out.output
    assert out.stdout == want + "\n"


@pytest.mark.parametrize(
    "flag,value,message",
    [("--image", "nope.png", "image not found"), ("--model", "no-such-model", "not a saved lmm model")],
)
def test_one_shot_with_a_bad_argument_names_it(saved, tmp_path, flag, value, message):
    _, d, image, _ = saved
    args = {"--model": str(d / "model"), "--image": str(image)}
    args[flag] = str(tmp_path / value)
    out = run_cli("chat", "--model", args["--model"], "--image", args["--image"], "--prompt", "hi")
    assert out.exit_code == 2
    assert message in out.output and flag in out.output
