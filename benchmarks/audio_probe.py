"""How much of the mouth shape is linearly decodable from the U-Net's audio conditioning: the
measurement behind the demo bundle's audio-encoder choice (docs/TRAINING.md).

For every video frame of a labelled speech corpus (``lipsync data synth`` clips: ``<id>.json``
with ``split``, ``phones`` and ``visemes.per_frame`` beside ``<id>.mp4`` or ``<id>.wav``), it
builds the features the U-Net sees for that frame and fits ridge-regression probes on the
training clips, scored on the held-out ones (other sentences and voices):

* ``open`` (mouth opening viseme parameter): Pearson r on held-out frames;
* all five viseme parameters: mean r;
* phone class (one-hot ridge, argmax): accuracy, and the majority-class baseline.

Features per frame: ``whisper-seeded-S`` = the frozen Whisper-tiny with seeded weights
(:func:`lipsync.own_checkpoints.seeded_audio_encoder`), the frame's own two 20 ms positions of
all five layers (3840 numbers); ``whisper-official`` the same with ``--whisper tiny.pt``;
``log-mel`` = Whisper's log-mel spectrogram over the frame ± 40 ms (8 × 80 numbers: the
information the encoder starts from); ``shuffled`` = seeded features of another clip (chance).

    python benchmarks/audio_probe.py CLIPS_DIR --out probe.json [--seeds 0,1] [--whisper tiny.pt]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lipsync.audio import AudioEncoder, frame_windows, load_audio, log_mel_spectrogram  # noqa: E402
from lipsync.own_checkpoints import seeded_audio_encoder  # noqa: E402


def load_clips(root: Path) -> list[dict]:
    clips = []
    for meta in sorted(root.glob("*.json")):
        rec = json.loads(meta.read_text())
        found = [meta.with_suffix(s) for s in (".wav", ".mp4") if meta.with_suffix(s).exists()]
        media = found[0] if found else None
        if media is None or "visemes" not in rec:
            continue
        rows = np.asarray(rec["visemes"]["per_frame"], dtype=np.float32)
        centres = (np.arange(len(rows)) + 0.5) / 25.0
        phones = np.array(["SIL"] * len(rows), dtype=object)
        for p in rec.get("phones", []):
            phones[(centres >= p["start"]) & (centres < p["end"])] = p["label"]
        clips.append({"id": rec.get("id", meta.stem), "split": rec["split"],
                      "wav": load_audio(media), "visemes": rows, "phones": phones})  # fmt: skip
    return clips


def whisper_features(encoder: AudioEncoder, wav: np.ndarray, frames: int) -> np.ndarray:
    windows = frame_windows(encoder.features(wav))[:frames]  # (F, 50, 384): 10 positions x 5
    centre = windows.reshape(len(windows), 10, 5, 384)[:, 4:6]  # the frame's own 2 positions
    return centre.reshape(len(windows), -1).numpy()


def mel_features(wav: np.ndarray, frames: int) -> np.ndarray:
    mel = log_mel_spectrogram(wav).numpy()  # (80, M), 100 per second
    idx = np.clip(4 * np.arange(frames)[:, None] + np.arange(-4, 4)[None], 0, mel.shape[1] - 1)
    return mel[:, idx].transpose(1, 2, 0).reshape(frames, -1)


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    xb = np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1)
    a = xb.T @ xb + lam * np.eye(xb.shape[1], dtype=xb.dtype)
    a[-1, -1] -= lam  # no penalty on the bias
    return np.linalg.solve(a, xb.T @ y)


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1) @ w


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12))


def probe(train: list[tuple], test: list[tuple], inventory: list[str]) -> dict[str, float]:
    """train/test: (features (F, D), visemes (F, 5), phones (F,)) per clip."""
    xs = np.concatenate([t[0] for t in train]).astype(np.float64)
    mean, std = xs.mean(0), xs.std(0) + 1e-6
    cut = int(0.8 * len(train))  # the last training clips choose the ridge strength

    def stack(items):
        x = (np.concatenate([t[0] for t in items]) - mean) / std
        v = np.concatenate([t[1] for t in items])
        p = np.concatenate([t[2] for t in items])
        onehot = (p[:, None] == np.array(inventory)[None]).astype(np.float64)
        return x, v, p, onehot

    x_fit, v_fit, _, o_fit = stack(train[:cut])
    x_val, v_val, p_val, o_val = stack(train[cut:])
    best = max((10.0**k for k in range(0, 6)),
               key=lambda lam: pearson(predict(ridge(x_fit, v_fit[:, 0], lam), x_val),
                                       v_val[:, 0]))  # fmt: skip
    x_tr, v_tr, _, o_tr = stack(train)
    x_te, v_te, p_te, _ = stack(test)
    w_vis = ridge(x_tr, v_tr, best)
    pred_vis = predict(w_vis, x_te)
    w_ph = ridge(x_tr, o_tr, best)
    guess = np.array(inventory)[predict(w_ph, x_te).argmax(1)]
    majority = max(set(p_te), key=list(p_te).count)
    return {
        "open_r": pearson(pred_vis[:, 0], v_te[:, 0]),
        "visemes_mean_r": float(
            np.mean([pearson(pred_vis[:, j], v_te[:, j]) for j in range(5) if v_te[:, j].std() > 0])
        ),  # fmt: skip
        "phone_accuracy": float((guess == p_te).mean()),
        "phone_majority_baseline": float((p_te == majority).mean()),
        "ridge_lambda": best,
        "dims": int(x_tr.shape[1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("clips", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--whisper", type=Path, help="an official whisper tiny.pt, for comparison")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.time()
    clips = load_clips(args.clips)
    train = [c for c in clips if c["split"] == "train"]
    test = [c for c in clips if c["split"] != "train"]
    inventory = sorted({p for c in train for p in c["phones"]})
    features: dict[str, list[np.ndarray]] = {"log-mel": [], "shuffled": []}
    encoders = {f"whisper-seeded-{s}": seeded_audio_encoder(int(s)) for s in args.seeds.split(",")}
    if args.whisper:
        encoders["whisper-official"] = AudioEncoder.from_checkpoint(args.whisper)
    for name in encoders:
        features[name] = []
    for c in clips:
        n = len(c["visemes"])
        features["log-mel"].append(mel_features(c["wav"], n))
        for name, enc in encoders.items():
            features[name].append(whisper_features(enc, c["wav"], n))
    first = next(iter(encoders))
    for i, c in enumerate(clips):  # another clip's features, cut or tiled to this clip's length
        other = features[first][(i + 1) % len(clips)]
        features["shuffled"].append(np.resize(other, (len(c["visemes"]), other.shape[1])))
    results = {}
    for name, feats in features.items():
        items = [(f, c["visemes"], c["phones"]) for f, c in zip(feats, clips, strict=True)]
        tr = [it for it, c in zip(items, clips, strict=True) if c["split"] == "train"]
        te = [it for it, c in zip(items, clips, strict=True) if c["split"] != "train"]
        results[name] = probe(tr, te, inventory)
        print(name, json.dumps(results[name]), flush=True)
    report = {
        "what": "ridge probes from per-frame audio features to viseme parameters and phones",
        "clips": {"train": len(train), "test": len(test)},
        "frames": {"train": int(sum(len(c["visemes"]) for c in train)),
                   "test": int(sum(len(c["visemes"]) for c in test))},
        "phones": len(inventory),
        "results": results,
        "seconds": round(time.time() - t0, 1),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
