"""`lmm chat`: an interactive terminal chat with images, videos and audio clips (or one question with --prompt),
answers streamed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import typer

HELP_TEXT = """Commands:
  /image PATH     attach an image to your next message (or write @PATH, or @"PATH WITH SPACES", in it)
  /video PATH     attach a video (frames sampled as in training); @clip.mp4 too
  /audio PATH     attach an audio clip (models with an audio encoder); @clip.wav too
  /reset          forget the conversation (history and images)
  /save FILE      write the conversation as JSON (messages with image paths; model.chat can read it back)
  /set NAME VALUE change a setting: max_new_tokens, temperature (0: greedy), top_p, seed (or none)
  /help           this help
  /quit           leave (Ctrl-D too)
Ctrl-C stops the answer being written (the part shown stays in the history) without leaving."""

_MENTION = re.compile(r'@"([^"]+)"|@(\S+)')
PROMPT = "you> "
ANSWER = "assistant> "


def load_model(name: str, device: str | None = None):
    """LMM from a save_pretrained directory or a preset name; a bad name is a clear command-line error."""
    from lmm import presets
    from lmm.config import ConfigError
    from lmm.model import CONFIG_FILE

    path = Path(name)
    if path.exists() and not (path / CONFIG_FILE).is_file():
        raise typer.BadParameter(
            f"{name} is not a saved lmm model (no {CONFIG_FILE} inside); pass a directory "
            f"written by save_pretrained or a preset name",
            param_hint="--model",
        )
    try:
        return presets.load(name, device=device)
    except ConfigError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None


class ChatSession:
    """The conversation: history (with images), pending attachments, streaming one answer at a time."""

    def __init__(self, model, max_new_tokens: int = 256, system: str | None = None, out=None, **gen_kwargs):
        self.model, self.max_new_tokens, self.system, self.gen_kwargs = model, max_new_tokens, system, gen_kwargs
        self.out = out or sys.stdout
        self.context = getattr(model.lm.config, "max_position_embeddings", None)
        self.reset()

    def reset(self) -> None:
        self.history: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.pending: list[dict] = []

    def attach(self, path: str, kind: str | None = None) -> None:
        """Load and keep an image, video or audio clip (`kind`, else from the file's suffix) for the next message;
        a missing or undecodable file raises ValueError."""
        from lmm.inputs import load_media, media_kind

        p = Path(path).expanduser()
        kind = kind or media_kind(p)
        self.pending.append({"type": kind, kind: load_media(self.model, p, kind), "path": str(p)})

    def _take_mentions(self, text: str) -> str:
        from lmm.inputs import media_kind

        def repl(m: re.Match) -> str:
            raw = m.group(1) or m.group(2)
            p = Path(raw).expanduser()
            if p.is_file() or media_kind(p, None) is not None or m.group(1):
                self.attach(raw)
                return ""
            return m.group(0)  # "@someone" that is not a file stays text

        return re.sub(r"\s{2,}", " ", _MENTION.sub(repl, text)).strip()

    def ask(self, text: str) -> str:
        """Add the user's message (with pending and @-mentioned images), stream the answer, return it."""
        saved = list(self.pending)
        try:
            text = self._take_mentions(text)
        except ValueError:
            self.pending = saved
            raise
        message = {"role": "user", "content": [*self.pending, {"type": "text", "text": text}]}
        prompt, images = self._render(self.history + [message])
        self.pending = []
        self.history.append(message)
        answer = []
        self.out.write(ANSWER)
        self.out.flush()
        try:
            for piece in self.model.stream(
                prompt,
                images,
                add_special_tokens=False,
                stop_at_end_of_chunk=False,
                max_new_tokens=self._budget(prompt),
                **self.gen_kwargs,
            ):
                answer.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [interrupted]")
        except ValueError:
            self.history.pop()
            self.pending = saved
            raise
        finally:
            self.out.write("\n")
            self.out.flush()
        self.history.append({"role": "assistant", "content": "".join(answer)})
        return "".join(answer)

    def _render(self, messages: list[dict]):
        return self.model.render_chat(messages)  # exactly as model.chat renders it

    def _budget(self, prompt: str) -> int:
        if self.context is None:
            return self.max_new_tokens
        used = len(self.model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if used >= self.context:
            raise ValueError(
                f"the conversation ({used} tokens) fills the model's context of {self.context} "
                f"tokens; /reset to start over"
            )
        return min(self.max_new_tokens, self.context - used)

    def set(self, name: str, value: str) -> str:
        """Change one generation setting; returns a confirmation line."""
        try:
            if name == "max_new_tokens":
                self.max_new_tokens = int(value)
                if self.max_new_tokens < 1:
                    raise ValueError
            elif name == "temperature":
                t = float(value)
                if t < 0:
                    raise ValueError
                self.gen_kwargs.update(do_sample=t > 0, temperature=t if t > 0 else 1.0)
            elif name == "top_p":
                p = float(value)
                if not 0 < p <= 1:
                    raise ValueError
                self.gen_kwargs["top_p"] = p
            elif name == "seed":
                self.gen_kwargs["seed"] = None if value.lower() == "none" else int(value)
            else:
                raise KeyError(name)
        except KeyError:
            raise ValueError(f"unknown setting {name!r}; use max_new_tokens, temperature, top_p or seed") from None
        except ValueError:
            raise ValueError(f"bad value {value!r} for {name}") from None
        return f"{name} = {value}"

    def save(self, file: str) -> Path:
        """The history as JSON: the messages `model.chat` takes, images as their file paths."""

        def part(p):
            return {"type": p["type"], p["type"]: p["path"]} if "path" in p else p

        msgs = [
            {
                "role": m["role"],
                "content": m["content"] if isinstance(m["content"], str) else [part(p) for p in m["content"]],
            }
            for m in self.history
        ]
        path = Path(file).expanduser()
        path.write_text(json.dumps(msgs, indent=2, ensure_ascii=False))
        return path

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            self.out.write(HELP_TEXT + "\n")
        elif cmd == "/reset":
            self.reset()
            self.out.write("conversation cleared\n")
        elif cmd in ("/image", "/video", "/audio"):
            if not arg:
                raise ValueError(f"usage: {cmd} PATH")
            self.attach(arg.strip('"'), cmd[1:])
            self.out.write(f"attached {arg} ({len(self.pending)} attachment(s) for your next message)\n")
        elif cmd == "/set":
            self.out.write(
                self.set(*arg.split(None, 1)) + "\n"
                if len(arg.split()) == 2
                else "usage: /set NAME VALUE (max_new_tokens, temperature, top_p, seed)\n"
            )
        elif cmd == "/save":
            if not arg:
                raise ValueError("usage: /save FILE")
            self.out.write(f"saved {len(self.history)} message(s) to {self.save(arg)}\n")
        else:
            raise ValueError(f"unknown command {cmd}; /help lists the commands")
        return True

    def loop(self) -> None:
        """Read lines until /quit or end of input."""
        self.out.write("lmm chat: type a message, /help for commands, /quit to leave.\n")
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                self.out.write("\n")
                return
            except KeyboardInterrupt:
                self.out.write("\n(Ctrl-C stops an answer; /quit or Ctrl-D leaves)\n")
                continue
            if not line.strip():
                continue
            try:
                if line.lstrip().startswith("/"):
                    if not self.command(line):
                        return
                else:
                    self.ask(line)
            except ValueError as e:
                self.out.write(f"error: {e}\n")
            except OSError as e:  # e.g. /save into a missing folder
                self.out.write(f"error: {e}\n")
            self.out.flush()


def register(app: typer.Typer) -> None:
    @app.command(
        "chat",
        help="Chat with a model in the terminal (images, videos, audio by /image, /video, /audio PATH or @PATH; "
        "/help inside).\n\n"
        "With --prompt: answer one message and exit, e.g.\n\n"
        "  lmm chat --model runs/my-model --image cat.png --prompt 'What is this?'",
    )
    def chat_command(
        model: str = typer.Option(..., "--model", help="A save_pretrained directory or a preset name."),
        prompt: str | None = typer.Option(None, "--prompt", help="Answer this one message and exit."),
        image: list[Path] = typer.Option([], "--image", help="Image(s) for the first message (repeatable)."),
        video: list[Path] = typer.Option([], "--video", help="Video(s) for the first message (repeatable)."),
        audio: list[Path] = typer.Option([], "--audio", help="Audio clip(s) for the first message (repeatable)."),
        system: str | None = typer.Option(None, "--system", help="A system message."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest answer in tokens."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; >0: sample."),
        top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
        seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if any)."),
        compile: bool = typer.Option(
            False, "--compile", help="torch.compile the decode step (static KV cache); the first answer compiles."
        ),
    ):
        sample = temperature > 0
        gen = dict(
            do_sample=sample, temperature=temperature if sample else 1.0, top_p=top_p if sample else 1.0, seed=seed
        )
        if compile:
            gen["compile"] = True
        from lmm.generation import load_images

        try:  # check the images before loading a (possibly large) model
            load_images(image)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--image") from None
        for hint, paths in (("--video", video), ("--audio", audio)):
            for p in paths:
                if not p.is_file():
                    raise typer.BadParameter(f"file not found: {p}", param_hint=hint)
        session = ChatSession(load_model(model, device), max_new_tokens=max_new_tokens, system=system, **gen)
        try:
            for kind, paths in (("image", image), ("video", video), ("audio", audio)):
                for p in paths:
                    session.attach(str(p), kind)
        except ValueError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        if prompt is not None:
            session.out = _Quiet(sys.stdout)
            try:
                session.ask(prompt)
            except ValueError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(1) from None
            return
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:
            pass
        session.loop()


class _Quiet:
    """stdout for --prompt mode: the answer alone, without the 'assistant> ' label."""

    def __init__(self, out):
        self._out = out

    def write(self, s: str) -> None:
        if s != ANSWER:
            self._out.write(s)

    def flush(self) -> None:
        self._out.flush()
