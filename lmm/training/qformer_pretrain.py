"""BLIP-2 stage 1: train a BERT Q-Former against the frozen vision tower alone with ITC + ITM + ITG.

    python -m lmm.training.qformer_pretrain --config configs/qformer_stage1.yaml [dotted.key=value ...]

Data: a JSONL file of image-caption pairs ({"image": path, "caption": text} per line; relative paths from the
file's folder). The frozen tower's features are computed once. Writes `<output_dir>/qformer.safetensors` (the
Q-Former as `qformer.*`, the stage-1 heads as `heads.*`), its tokenizer and the resolved config; stage 2 is an
ordinary training run with `bridge.kind: qformer`, `bridge.qformer.variant: blip2` and
`bridge.qformer.init_from: <output_dir>/qformer.safetensors` (same qformer sizes, same vision tower).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmm.adapters.qformer import BertQFormer
from lmm.adapters.qformer_objectives import Stage1Heads, itc_similarities, itm_logits, stage1_losses
from lmm.blip2 import DEC_TOKEN, STAGE1_FILE, build_qformer, load_bert_weights, qformer_tokenizer
from lmm.config import ConfigError, QFormerConfig, VisionConfig, YamlConfig


@dataclass
class LossWeights:
    itc: float = 1.0
    itm: float = 1.0
    itg: float = 1.0


@dataclass
class QFormerPretrainConfig(YamlConfig):
    """One stage-1 run."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(variant="blip2", cross_every=2))
    data: str = ""  # JSONL of {"image": path, "caption": text}
    eval_data: str | None = None  # held-out pairs: retrieval top-1 and hard-negative ITM accuracy at the end
    output_dir: str = "runs/qformer_stage1"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    vocab_size: int = 2000  # WordPiece vocabulary trained on the captions when there is no qformer.bert_path
    loss_weights: LossWeights = field(default_factory=LossWeights)
    log_every: int = 50
    seed: int = 0
    device: str | None = None

    def validate(self) -> QFormerPretrainConfig:
        if self.qformer.variant != "blip2":
            raise ConfigError("qformer_pretrain trains the BLIP-2 Q-Former: set qformer.variant=blip2")
        if not self.data or not Path(self.data).is_file():
            raise ConfigError(f"data: image-caption JSONL file not found: {self.data!r}")
        if self.eval_data is not None and not Path(self.eval_data).is_file():
            raise ConfigError(f"eval_data: file not found: {self.eval_data!r}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (in-batch negatives)")
        return self


def read_pairs(path: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) per JSONL line; a line without both is an error naming the line."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        image, caption = rec.get("image"), rec.get("caption", rec.get("text"))
        if not isinstance(image, str) or not isinstance(caption, str):
            raise ValueError(f"{path}:{n}: each line needs an 'image' path and a 'caption' string")
        out.append(((path.parent / image) if not Path(image).is_absolute() else Path(image), caption))
    if len(out) < 2:
        raise ValueError(f"{path}: needs at least 2 image-caption pairs")
    return out


@torch.no_grad()
def image_features(tower, paths, device, batch: int = 64) -> torch.Tensor:
    """Frozen features (N, 1, T, D) of image files (one frame each)."""
    from lmm.generation import load_images

    feats = []
    for s in range(0, len(paths), batch):
        pix = torch.stack([tower.preprocess(im) for im in load_images(paths[s : s + batch])]).to(device)
        feats.append(tower(pix).float())
    return torch.cat(feats)[:, None]


class Stage1Data:
    """Features, token ids and masks of a pair file, on the device."""

    def __init__(self, pairs, tower, tokenizer, max_len: int, device):
        self.feats = image_features(tower, [p for p, _ in pairs], device)
        enc = tokenizer(
            [c for _, c in pairs], padding="longest", truncation=True, max_length=max_len, return_tensors="pt"
        )
        self.ids, self.mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def __len__(self) -> int:
        return self.ids.shape[0]


@torch.no_grad()
def evaluate(qformer: BertQFormer, heads: Stage1Heads, data: Stage1Data) -> dict[str, float]:
    """Retrieval top-1 (image->text, text->image; chance 1/N; a retrieved row with the same caption counts as
    right) and ITM accuracy on every positive pair and its hardest negative text (the most ITC-similar other
    caption; chance 0.5)."""
    Q = qformer.tokens_per_media
    h = qformer.encode(data.feats, data.ids, data.mask, "unimodal")
    img = F.normalize(heads.vision_proj(h[:, :Q]), dim=-1)
    txt = F.normalize(heads.text_proj(h[:, Q]), dim=-1)
    sim_i2t, _ = itc_similarities(img, txt, 1.0)
    N = sim_i2t.shape[0]
    target = torch.arange(N, device=sim_i2t.device)
    same = (data.ids[:, None] == data.ids[None]).all(-1)  # the pair itself, or the same caption: not a negative
    i2t = same[target, sim_i2t.argmax(1)].float().mean().item()
    t2i = same[sim_i2t.argmax(0), target].float().mean().item()
    hard = sim_i2t.masked_fill(same, float("-inf")).argmax(1)
    feats = torch.cat([data.feats, data.feats])
    ids, mask = torch.cat([data.ids, data.ids[hard]]), torch.cat([data.mask, data.mask[hard]])
    hb = qformer.encode(feats, ids, mask, "bidirectional")
    pred = itm_logits(heads, hb[:, :Q]).argmax(1)
    truth = torch.cat([torch.ones(N), torch.zeros(N)]).to(pred.device).long()
    return {
        "i2t_top1": i2t,
        "t2i_top1": t2i,
        "itm_acc": (pred == truth).float().mean().item(),
        "chance_top1": same.float().mean().item(),
    }


def pretrain(cfg: QFormerPretrainConfig) -> dict:
    """Run stage 1; returns the final metrics (and losses) and writes the outputs."""
    from safetensors.torch import save_file

    from lmm.backbones.vision import build_vision_tower

    cfg.validate()
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pairs = read_pairs(cfg.data)
    tok = qformer_tokenizer(cfg.qformer.bert_path, [c for _, c in pairs], cfg.vocab_size)
    tower = build_vision_tower(cfg.vision).to(device).eval().requires_grad_(False)
    data = Stage1Data(pairs, tower, tok, cfg.qformer.max_text_len, device)
    q = cfg.qformer
    qformer = build_qformer(q, tower.dim, vocab_size=len(tok)).to(device)
    heads = Stage1Heads(qformer.emb_norm.normalized_shape[0], q.embed_dim, len(tok)).to(device)
    if q.bert_path:
        load_bert_weights(qformer, q.bert_path, heads)
    params = list(qformer.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    dec_id = tok.convert_tokens_to_ids(DEC_TOKEN)
    w = cfg.loss_weights
    history = []
    for step in range(cfg.steps):
        idx = torch.randperm(len(data), generator=gen, device=device)[: cfg.batch_size]
        losses = stage1_losses(
            qformer, heads, data.feats[idx], data.ids[idx], data.mask[idx], dec_id, gen, cfg.label_smoothing
        )
        loss = w.itc * losses["itc"] + w.itm * losses["itm"] + w.itg * losses["itg"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            print(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in history[-1].items()), flush=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"qformer.{k}": v for k, v in qformer.state_dict().items()}
    state.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, out / STAGE1_FILE)
    tok.save_pretrained(out / "tokenizer")
    cfg.to_yaml(out / "stage1.yaml")
    metrics = {"first": history[0], "last": history[-1]}
    qformer.eval()
    if cfg.eval_data:
        metrics["eval"] = evaluate(
            qformer, heads, Stage1Data(read_pairs(cfg.eval_data), tower, tok, q.max_text_len, device)
        )
    metrics["train"] = evaluate(qformer, heads, data)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    import argparse

    from lmm.runtime import offline

    offline()
    ap = argparse.ArgumentParser(description="BLIP-2 stage 1: Q-Former pre-training (ITC + ITM + ITG)")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = ap.parse_args(argv)
    cfg = QFormerPretrainConfig.from_yaml(args.config, args.overrides)
    print(json.dumps(pretrain(cfg), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
