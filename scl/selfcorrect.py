"""Two-turn intrinsic self-correction and the SelfCorSet preference pairs.

The method as pure functions (`question_type`, `build_pairs`, `summarize`), one batch of rollouts
(`rollout_batch`), and `run_generate`, which streams records to disk. An unparsed answer gives type
None: counted apart from wrong, never paired. Batches are fixed and batch b samples with a generator
seeded by (seed, b), so a resumed run reproduces the uninterrupted one exactly.
"""
import dataclasses
import hashlib
import json
import os
import re
import time
from collections import Counter

import torch
from tqdm import tqdm

from scl.answers import extract_answer
from scl.files import atomic_write, fingerprint, read_json, read_jsonl, write_json, write_jsonl
from scl.data import BadRow, load_rows
from scl.generation import Context, generate
from scl.prompts import PROMPT_NAMES, review_message, turn1_message, turn1_message_official
from scl.tokenizer import pad_left, render_chat
from scl.weights import load_model_dir


@dataclasses.dataclass
class GenerateConfig:
    """Self-correction rollouts and SelfCorSet: python generate.py --model=DIR --data=FILE --out_dir=DIR"""
    model: str  # model folder: config.json, *.safetensors, tokenizer.json, tokenizer_config.json
    data: str  # MCQ rows: JSONL (image paths relative to the file), MMBench TSV, ScienceQA problems.json
    out_dir: str  # gets responses.jsonl, selfcorset.jsonl, summary.json, skipped.jsonl, config.json
    prompt: str = "vp2"  # review prompt: sp (no review) | cp | vp1 | vp2 | vp3 (the released code's default: vp2)
    rounds: int = 2  # turns per question: 2 = the paper; K > 2 repeats the review message
    samples: int = 1  # rollouts per question (1 = the paper); > 1 needs temperature > 0
    limit: int | None = None  # only the first N usable rows
    batch_size: int = 8  # rollouts per generate() call
    max_new_tokens: int = 256  # per turn (the paper's LLaVA setting)
    temperature: float = 0.0  # 0 = greedy (the paper's LLaVA decoding)
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    seed: int = 0  # batch b samples from a generator seeded with (seed, b)
    format: str | None = None  # data reader: jsonl | tsv | scienceqa | parquet; None = detect from the name
    split: str | None = None  # the split to read where a file or folder holds several (e.g. test, validation)
    turn1_layout: str = "scl"  # scl: hint, question, options one per line; paper: as the paper's released code
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "float32"  # float32 | bfloat16 | float16

    def __post_init__(self):  # a bad value stops before any model is loaded
        if self.prompt not in PROMPT_NAMES:
            raise ValueError(f"--prompt must be one of {', '.join(PROMPT_NAMES)}, got {self.prompt!r}")
        if min(self.rounds, self.samples, self.batch_size, self.max_new_tokens) < 1:
            raise ValueError("--rounds, --samples, --batch_size and --max_new_tokens must be >= 1")
        if self.samples > 1 and self.temperature <= 0:
            raise ValueError("--samples > 1 needs --temperature > 0 (greedy rollouts would be identical)")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise ValueError("--top_p must be in (0, 1] and --temperature >= 0")
        if self.turn1_layout not in ("scl", "paper"):
            raise ValueError(f"--turn1_layout must be scl or paper, got {self.turn1_layout!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def resolve_device(name: str) -> str:  # "auto" -> "cuda" when there is one, else "cpu"
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


# ---------------------------------------------------------------------------- the method, pure

def question_type(turn1_correct: bool, turn2_correct: bool) -> int:
    """The paper's Types: 1 right→right, 2 wrong→right, 3 right→wrong, 4 wrong→wrong."""
    return {(True, True): 1, (False, True): 2, (True, False): 3, (False, False): 4}[
        (bool(turn1_correct), bool(turn2_correct))]


def round_types(turns: list[dict]) -> list[int | None]:
    """Type of each round pair (k, k+1); None where either answer is unparsed."""
    return [None if a["answer"] is None or b["answer"] is None else question_type(a["correct"], b["correct"])
            for a, b in zip(turns, turns[1:])]


def type_counts(types) -> dict:
    """{"1".."4": how many of each Type, "unparsed": how many None}."""
    counts = Counter(types)
    return {**{str(t): counts[t] for t in (1, 2, 3, 4)}, "unparsed": counts[None]}


def build_pairs(records: list[dict]) -> list[dict]:
    """SelfCorSet: Type 2 → (chosen turn 2, rejected turn 1); Type 3 → (chosen turn 1, rejected turn 2).
    The type is recomputed from the answers, so a stored `type` cannot disagree with its pair."""
    pairs = []
    for r in records:
        kind = (round_types(r["turns"]) or [None])[0]
        if kind not in (2, 3):
            continue
        turn1, turn2 = r["turns"][0]["text"], r["turns"][1]["text"]
        chosen, rejected = (turn2, turn1) if kind == 2 else (turn1, turn2)
        pairs.append({"id": r["id"], "sample": r["sample"], "image": r["image"], "prompt": r["prompt"],
                      "chosen": chosen, "rejected": rejected, "type": kind})
    return pairs


def summarize(records: list[dict], skipped: list[dict]) -> dict:
    """Counts per type, accuracy per turn (an unparsed answer is not correct, and is counted alone), pairs."""
    n, rounds = len(records), max((len(r["turns"]) for r in records), default=0)
    turns = [[r["turns"][k] for r in records if len(r["turns"]) > k] for k in range(rounds)]
    correct = [sum(t["correct"] for t in ts) for ts in turns]
    unparsed = [sum(t["answer"] is None for t in ts) for ts in turns]
    types = [round_types(r["turns"]) for r in records]
    by_round = [type_counts(t[k] for t in types if len(t) > k) for k in range(rounds - 1)]
    pairs = build_pairs(records)
    return {
        "rollouts": n, "questions": len({r["id"] for r in records}),
        "accuracy": {f"turn{k + 1}": c / max(len(ts), 1) for k, (c, ts) in enumerate(zip(correct, turns))},
        "correct": {f"turn{k + 1}": c for k, c in enumerate(correct)},
        "wrong": {f"turn{k + 1}": len(ts) - c - u for k, (ts, c, u) in enumerate(zip(turns, correct, unparsed))},
        "unparsed": {f"turn{k + 1}": u for k, u in enumerate(unparsed)},
        "types": by_round[0] if by_round else {},
        "types_by_round": {f"turn{k + 1}->turn{k + 2}": t for k, t in enumerate(by_round)},
        "pairs": len(pairs), "pairs_by_type": {str(t): sum(p["type"] == t for p in pairs) for t in (2, 3)},
        "skipped": len(skipped),
    }


# ---------------------------------------------------------------------------- rollouts

def conversation(prompt: str, answers: list[str], review: str | None) -> list[dict]:
    """[user turn 1, assistant 1, user review, assistant 2, ...]: every earlier answer stays in context."""
    messages = [{"role": "user", "content": prompt}]
    for text in answers:
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": review}]
    return messages


def turn1(row, layout: str = "scl") -> str:
    """The turn-1 user message of a row, also its pair's prompt: our layout, or the paper's code's."""
    if layout == "paper":
        return turn1_message_official(row.question, row.options)
    return turn1_message(row.question, row.options, row.hint)


@torch.no_grad()
def rollout_batch(model, tok, processor, rows, samples, *, prompt, rounds, temperature=0.0, top_p=1.0,
                  max_new_tokens=256, generator=None, first=None, layout="scl", context=None) -> tuple[list[dict], int]:
    """K-turn rollouts of rows[i] as sample samples[i] -> (records, generated tokens). Each turn renders the
    whole conversation, and only what the KV cache does not hold yet is computed (the review and what the
    answer's text re-tokenizes to); `first`: turn-1 texts already generated; `context`: a cache to continue."""
    turns = 1 if prompt == "sp" else rounds
    review = review_message(prompt) if turns > 1 else None
    param = next(model.parameters())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [turn1(r, layout) for r in rows]
    answers, n_tokens = ([[t] for t in first] if first else [[] for _ in rows]), 0
    context = Context(model, len(rows)) if context is None else context
    for _ in range(turns - len(answers[0])):
        ids = context.new_tokens([render_chat(tok, conversation(p, a, review), model.config.num_image_tokens,
                                              add_generation_prompt=True)[0] for p, a in zip(prompts, answers)])
        see = [b for b, s in enumerate(ids) if tok.image_token_id in s]  # rows whose image the cache lacks
        pixel_values = processor([rows[b].image for b in see]).to(param.device, param.dtype) if see else None
        input_ids, attention_mask = pad_left(ids, pad)  # (B, T), (B, T)
        new = generate(model, input_ids.to(param.device), attention_mask.to(param.device), pixel_values,
                       max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=pad,
                       temperature=temperature, top_p=top_p, generator=generator, context=context)  # (B, T_new)
        for a, seq in zip(answers, new.tolist()):
            n = seq.index(tok.eos_token_id) + 1 if tok.eos_token_id in seq else len(seq)  # EOS kept, pads after
            n_tokens += n
            # The image token's text would be read as a second image when the answer is re-rendered.
            a.append(tok.decode(seq[:n], skip_special_tokens=True).replace(tok.image_token, "").strip())
    records = []
    for r, s, p, texts in zip(rows, samples, prompts, answers):
        letters = [extract_answer(t, len(r.options)) for t in texts]  # None = unparsed, never correct
        done = [{"text": t, "answer": a, "correct": a == r.answer} for t, a in zip(texts, letters)]
        types = round_types(done)
        records.append({"id": r.id, "sample": s, "gold": r.answer, "prompt": p, "image": r.image_path,
                        "turns": done, "type": types[0] if types else None, "types": types})
    return records, n_tokens


def plan_batches(tok, rows, samples: int, batch_size: int, layout="scl") -> list[list[tuple[int, int]]]:
    """Work items (row index, sample) cut into fixed batches, longest turn-1 prompt first: similar lengths
    pad less, and an out-of-memory shows at once."""
    length = [len(tok.encode(turn1(r, layout))) for r in rows]
    items = sorted(((i, s) for i in range(len(rows)) for s in range(samples)),
                   key=lambda it: (-length[it[0]], it[0], it[1]))
    return [items[j:j + batch_size] for j in range(0, len(items), batch_size)]


def batch_generator(seed: int, batch: int, device) -> torch.Generator:
    """The sampling generator of batch `batch`: depends only on (seed, batch index)."""
    digest = hashlib.sha256(f"{seed}:{batch}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def rollout(model, tok, processor, rows, *, prompts: dict[str, int], samples=1, temperature=0.0, top_p=1.0,
            seed=0, max_new_tokens=256, batch_size=8, first=None, layout="scl") -> dict[str, list[dict]]:
    """All rollouts of `rows` in memory for each review prompt ({prompt: rounds}), ordered by (row, sample).
    Every prompt continues the same turn 1 from the KV cache the first prompt left: `first` (one turn-1 text
    per row), else the turn 1 the first prompt generated (greedy evaluation asks every review prompt about
    one answer)."""
    out = {p: {} for p in prompts}
    device = next(model.parameters()).device
    for b, batch in enumerate(plan_batches(tok, rows, samples, batch_size, layout)):
        given = [rows[i] for i, _ in batch], [s for _, s in batch]
        context, turn1 = Context(model, len(batch)), [first[i] for i, _ in batch] if first else None
        for k, (p, rounds) in enumerate(prompts.items()):
            if k:  # each later prompt starts from the cache the first left: one prompt's turns held at a time
                context.restore(start)
            records, _ = rollout_batch(model, tok, processor, *given, prompt=p, rounds=rounds, temperature=temperature,
                                       top_p=top_p, max_new_tokens=max_new_tokens, layout=layout, first=turn1,
                                       generator=batch_generator(seed, b, device), context=context)
            if k == 0:
                turn1, start = turn1 or [r["turns"][0]["text"] for r in records], context.state()
            out[p].update(zip(batch, records))
    return {p: [got[k] for k in sorted(got)] for p, got in out.items()}


# ---------------------------------------------------------------------------- files and resume

def _image_file(row, out_dir: str) -> str:
    """The row's image path, or a PNG written once to out_dir/images/ for an image inside the data file.
    Decoded here either way, so a corrupt image is a BadRow now, not a crash mid-batch."""
    image = row.image
    if row.image_path:
        return row.image_path
    safe = re.sub(r"[^\w.-]", "_", row.id)
    name = safe if safe == row.id else f"{safe}_{hashlib.sha1(row.id.encode()).hexdigest()[:8]}"
    path = os.path.join(out_dir, "images", name + ".png")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def _usable(rows, tok, model, cfg):
    """-> (rows with image files, skipped with a reason: an unreadable image, an unrenderable prompt, or
    a K-turn conversation that could outgrow the model's positions)."""
    turns = 1 if cfg.prompt == "sp" else cfg.rounds
    review = len(tok.encode(review_message(cfg.prompt))) + 8 if turns > 1 else 0  # + the role markers
    limit, keep, skipped = model.config.text_config.max_position_embeddings, [], []
    for r in rows:
        try:
            ids, _ = render_chat(tok, conversation(turn1(r, cfg.turn1_layout), [], None), model.config.num_image_tokens,
                                 add_generation_prompt=True)
            need = len(ids) + turns * cfg.max_new_tokens + (turns - 1) * review
            if need > limit:
                raise BadRow(f"too long: {turns} turns may need {need} positions, max_position_embeddings is {limit}")
            keep.append(dataclasses.replace(r, image_path=_image_file(r, cfg.out_dir)))
        except (BadRow, ValueError) as e:
            reason = str(e) if isinstance(e, BadRow) else f"cannot render the prompt: {e}"
            skipped.append({"id": r.id, "reason": reason})
    return keep, skipped


def run_generate(cfg: GenerateConfig, model=None, tok=None, processor=None) -> dict:
    """Roll out every usable row of cfg.data into cfg.out_dir, flushed batch by batch -> the summary. A re-run
    with the same inputs (fingerprint) skips what is done; other inputs start over: one file, one run."""
    start, cfg = time.time(), dataclasses.replace(cfg, device=resolve_device(cfg.device))
    rows, skipped = load_rows(cfg.data, format=cfg.format, limit=cfg.limit, split=cfg.split)  # bad rows: skipped
    if model is None:
        model, tok, processor = load_model_dir(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    if tok.image_token_id != model.config.image_token_index:
        raise ValueError(f"{cfg.model}: tokenizer's {tok.image_token} id {tok.image_token_id} != "
                         f"image_token_index {model.config.image_token_index} in config.json")
    os.makedirs(cfg.out_dir, exist_ok=True)
    out = {name: os.path.join(cfg.out_dir, name + ".jsonl") for name in ("responses", "selfcorset", "skipped")}
    rows, unusable = _usable(rows, tok, model, cfg)
    setting = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("model", "data", "out_dir", "device")}
    key = fingerprint(setting, files=[cfg.data, *sorted({r.image_path for r in rows})], models=[cfg.model])
    before = read_json(os.path.join(cfg.out_dir, "config.json")) or {}
    done = {}
    if before.get("fingerprint") == key:
        done = {(r["id"], r["sample"]): r for r in read_jsonl(out["responses"])}
    elif os.path.exists(out["responses"]):
        print(f"generate: {cfg.out_dir} holds rollouts of other inputs (model, data or settings); starting over")
    write_json(os.path.join(cfg.out_dir, "config.json"), {**dataclasses.asdict(cfg), "fingerprint": key})
    write_jsonl(out["skipped"], skipped + unusable)
    order = {(r.id, s): n for n, (r, s) in enumerate((r, s) for r in rows for s in range(cfg.samples))}
    done = {k: r for k, r in done.items() if k in order}
    if done:
        print(f"generate: reusing {len(done)} of {len(order)} rollouts in {cfg.out_dir} (same inputs)")
    write_jsonl(out["responses"], list(done.values()))  # drops a cut-short last line before appending
    write_jsonl(out["selfcorset"], build_pairs(list(done.values())))

    device, n_tokens, seconds = next(model.parameters()).device, 0, 1e-9
    bar = tqdm(total=len(order), initial=len(done), desc="self-correction", unit="q", dynamic_ncols=True)
    with open(out["responses"], "a") as responses, open(out["selfcorset"], "a") as pairs:
        for b, batch in enumerate(plan_batches(tok, rows, cfg.samples, cfg.batch_size, cfg.turn1_layout)):
            if all((rows[i].id, s) in done for i, s in batch):
                continue  # finished by an earlier run; a partly finished batch is redone whole
            t0 = time.time()
            records, tokens = rollout_batch(
                model, tok, processor, [rows[i] for i, _ in batch], [s for _, s in batch],
                prompt=cfg.prompt, rounds=cfg.rounds, temperature=cfg.temperature, top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens, generator=batch_generator(cfg.seed, b, device),
                layout=cfg.turn1_layout)
            seconds, n_tokens = seconds + time.time() - t0, n_tokens + tokens
            new = [r for r in records if (r["id"], r["sample"]) not in done]
            for r in new:  # image paths relative to the folder of the files, as in our data files
                r["image"] = os.path.relpath(os.path.abspath(r["image"]), os.path.abspath(cfg.out_dir))
                done[(r["id"], r["sample"])] = r
            responses.writelines(json.dumps(r) + "\n" for r in new)
            pairs.writelines(json.dumps(p) + "\n" for p in build_pairs(new))
            responses.flush(), pairs.flush()
            acc = [sum(r["turns"][k]["correct"] for r in done.values()) / len(done) for k in (0, -1)]
            bar.set_postfix(acc1=f"{acc[0]:.3f}", acc_last=f"{acc[1]:.3f}", tok_s=f"{n_tokens / seconds:.0f}")
            bar.update(len(new))
    bar.close()

    records = sorted(done.values(), key=lambda r: order[(r["id"], r["sample"])])
    write_jsonl(out["responses"], records)
    write_jsonl(out["selfcorset"], build_pairs(records))
    summary = {**summarize(records, skipped + unusable), "seconds": round(time.time() - start, 2),
               "generated_tokens": n_tokens, "tokens_per_s": round(n_tokens / seconds, 2),
               "fingerprint": key}  # seconds and tokens: this invocation's work only
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    return summary
