"""DPO for Self-Correction Learning: SelfCorSet pairs -> token ids -> padded batch -> sequence log-probs
-> the paper's loss, with β = 0.1 and α = 0.1 (ms-swift's `sft_beta`):

    L = (1 - α) · -log σ(β [(log πθ(Rc) - log πref(Rc)) - (log πθ(Rr) - log πref(Rr))])  +  α · NLL(Rc)

Shapes: B pairs, T tokens (Tp prompt, Tr response), D width, V vocab.
"""
import json
import os

import torch
import torch.nn.functional as F

from kernels import linear_token_logprobs
from scl.image import open_image
from scl.tokenizer import pad_left, render_chat


class SkipPair(ValueError):
    """A pair that cannot be trained on; its message is the reason written to the skip log."""


# ------------------------------------------------------------------------- pairs -> token ids -> padded batch

def _split_conversation(tok, user, response, num_image_tokens):
    """(prompt ids, response ids) of the rendered [user, assistant] conversation, cut by the loss mask."""
    ids, mask = render_chat(tok, [user, {"role": "assistant", "content": response}], num_image_tokens)
    start, end = mask.index(1), len(mask) - mask[::-1].index(1)
    # One assistant turn: the trained span is one block (content + end-of-turn token). ChatML renders a
    # "\n" after <|im_end|>; it is not part of the answer and is dropped, so responses end at the EOS.
    assert all(mask[start:end]), "loss mask of a single answer is not one contiguous span"
    return ids[:start], ids[start:end]


def encode_pair(tok, prompt: str, chosen: str, rejected: str, num_image_tokens: int, max_length: int) -> dict:
    """Token ids of one pair: {"prompt_ids", "chosen_ids", "rejected_ids"}, the generation prompt and
    the answers as the model reads and writes them at evaluation, token for token. Too long raises
    SkipPair, never truncates: a cut prompt loses image tokens, a cut response changes what is scored."""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise SkipPair(f"empty {name} response")
    user = {"role": "user", "content": prompt}
    gen_prompt, _ = render_chat(tok, [user], num_image_tokens, add_generation_prompt=True)
    prompt_c, chosen_ids = _split_conversation(tok, user, chosen, num_image_tokens)
    prompt_r, rejected_ids = _split_conversation(tok, user, rejected, num_image_tokens)
    # Footgun: render_chat encodes the whole conversation at once, so a tokenizer that merged across the
    # prompt/answer boundary would make the trained prefix differ from the generation prompt: skipped.
    if not (prompt_c == prompt_r == gen_prompt):
        raise SkipPair("prompt tokens depend on the response (tokenizer merges across the turn boundary)")
    n_img = gen_prompt.count(tok.image_token_id)  # 0 if the tokenizer has none (render_chat then refuses images)
    if n_img != num_image_tokens:  # the classic "image features and image tokens do not match"
        raise SkipPair(f"prompt has {n_img} image tokens, expected {num_image_tokens}")
    longest = len(gen_prompt) + max(len(chosen_ids), len(rejected_ids))
    if longest > max_length:
        raise SkipPair(f"prompt + response is {longest} tokens > max_length {max_length}")
    return {"prompt_ids": gen_prompt, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def read_pairs(path: str, tok, proc, num_image_tokens: int, max_length: int) -> tuple[list, list]:
    """selfcorset.jsonl -> (pairs: encode_pair's ids + "pixel_values" (3, S, S) + a unique "id",
    skipped: [{"line", "reason"}]). Image paths are relative to the file."""
    base = os.path.dirname(os.path.abspath(path))
    pairs, skipped = [], []
    with open(path) as f:
        for n, line in enumerate(f):
            try:
                row = json.loads(line)
                image_path = os.path.join(base, row["image"])
                try:
                    image = open_image(image_path)
                except (OSError, ValueError) as e:
                    raise SkipPair(f"image {row['image']!r} unreadable: {e.__class__.__name__}")
                enc = encode_pair(tok, row["prompt"], row["chosen"], row["rejected"], num_image_tokens, max_length)
                pairs.append({**enc, "pixel_values": proc([image])[0], "image_path": image_path,  # (3, S, S)
                              "id": str(row.get("id", n)) + f"#{n}"})
            except SkipPair as e:
                skipped.append({"line": n, "reason": str(e)})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                skipped.append({"line": n, "reason": f"malformed row: {e.__class__.__name__}: {e}"})
    return pairs, skipped


def collate_pairs(encoded: list, pad_id: int) -> dict:
    """Prompts left-padded to (B, Tp), so every prompt's last state sits at column Tp - 1; both responses
    right-padded to one (B, Tr), so the 2B rows stack. Masks come from lengths, never from `ids == pad_id`
    (pad may equal EOS, a scored token)."""
    prompt_ids, prompt_mask = pad_left([e["prompt_ids"] for e in encoded], pad_id)  # (B, Tp)
    out = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}
    Tr = max(max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in encoded)
    for side in ("chosen", "rejected"):
        seqs = [e[f"{side}_ids"] for e in encoded]
        out[f"{side}_ids"] = torch.tensor([s + [pad_id] * (Tr - len(s)) for s in seqs])  # (B, Tr)
        out[f"{side}_mask"] = torch.tensor([[1] * len(s) + [0] * (Tr - len(s)) for s in seqs])  # (B, Tr)
    return out


def make_batch(pairs: list, pad_id: int, device) -> tuple[dict, torch.Tensor]:
    """Encoded pairs -> (collated id tensors, pixel_values (B, 3, S, S)) on `device`."""
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
    return batch, torch.stack([p["pixel_values"] for p in pairs]).to(device)


# ----------------- sequence log-probs: log π(response | prompt, image) = Σ_t log π(y_t | y_<t, prompt, image)

def concatenated_forward(model, batch: dict, pixel_values=None, share_prefix: bool = True, impl=None) -> dict:
    """-> (B,) chosen_logps, rejected_logps, chosen_nll (per-token mean, for the SFT term), chosen_tokens.

    share_prefix: image and prompt run once and both responses continue from the prompt's KV cache,
    repeated with torch.cat, which keeps the graph, so both responses' gradients reach the shared prefix.
    Without it, 2B full sequences: the plain reference, same numbers and gradients (tests/test_dpo.py).
    The passes that feed the head keep no cache (use_cache=False): each layer's keys and values are freed
    as the next layer runs instead of living to the end of the pass (hundreds of MB at a real size)."""
    B, Tp = batch["prompt_ids"].shape
    resp_ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, Tr)
    resp_mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])  # (2B, Tr)
    prompt_mask2 = batch["prompt_mask"].repeat(2, 1)  # (2B, Tp)
    # The last response token (EOS of the longest row) predicts nothing, so it is never fed in: the
    # inputs are response[:, :-1] and the predicting states are [last prompt state, response states].
    if share_prefix:
        h_prompt, past = model.forward_hidden(batch["prompt_ids"], pixel_values, batch["prompt_mask"])  # (B, Tp, D)
        past = [(torch.cat([k, k]), torch.cat([v, v])) for k, v in past]  # each (2B, H_kv, Tp, Dh)
        mask = torch.cat([prompt_mask2, resp_mask[:, :-1]], 1)  # (2B, Tp+Tr-1): covers past + current
        h_resp, _ = model.forward_hidden(resp_ids[:, :-1], attention_mask=mask, past_key_values=past,
                                         use_cache=False)  # (2B, Tr-1, D)
        # Prompts are left-padded, so column Tp-1 is every row's last real prompt token.
        hidden = torch.cat([h_prompt[:, -1:].repeat(2, 1, 1), h_resp], 1)  # (2B, Tr, D)
    else:
        ids = torch.cat([batch["prompt_ids"].repeat(2, 1), resp_ids], 1)  # (2B, Tp+Tr)
        mask = torch.cat([prompt_mask2, resp_mask], 1)  # (2B, Tp+Tr)
        pix = None if pixel_values is None else pixel_values.repeat(2, 1, 1, 1)  # (2B, 3, S, S)
        h, _ = model.forward_hidden(ids[:, :-1], pix, attention_mask=mask[:, :-1], use_cache=False)  # (2B, Tp+Tr-1, D)
        hidden = h[:, Tp - 1:]  # (2B, Tr, D): position Tp-1+t predicts response token t
    # Summed over the real tokens (the DPO reference's `_get_batch_logps`); pads never reach the head.
    keep = resp_mask.bool()  # (2B, Tr)
    per_token = linear_token_logprobs(hidden[keep], model.lm_head_weight, resp_ids[keep], impl=impl)  # (n_real,) fp32
    logps = per_token.new_zeros(keep.shape).masked_scatter(keep, per_token).sum(-1)  # (2B,)
    tokens = keep.sum(-1)  # (2B,)
    return {"chosen_logps": logps[:B], "rejected_logps": logps[B:],
            "chosen_nll": -logps[:B] / tokens[:B].clamp(min=1), "chosen_tokens": tokens[:B]}


# ------------------ the loss: DPO (Rafailov et al. 2023, eq. 7) plus the paper's SFT term; TRL's metric names

def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float = 0.1, sft_alpha: float = 0.1, chosen_nll=None):
    """Sigmoid DPO plus α times the chosen response's NLL; all log-probs (B,) summed over a response.
    -> (scalar loss, metrics under TRL's names). The SFT term averages per-pair token means: with the
    paper's micro-batch of 1, ms-swift's token-mean cross-entropy exactly."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps  # (B,)
    ref_logratios = reference_chosen_logps - reference_rejected_logps  # (B,)
    loss = -F.logsigmoid(beta * (pi_logratios - ref_logratios)).mean()
    if sft_alpha:
        if chosen_nll is None:
            raise ValueError("dpo_loss: sft_alpha > 0 needs chosen_nll (from concatenated_forward)")
        loss = (1 - sft_alpha) * loss + sft_alpha * chosen_nll.mean()
    # Implicit rewards (the DPO paper, section 5): β·log(πθ/πref); they are diagnostics and carry no gradient.
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()  # (B,)
    metrics = {
        "loss": loss.item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }
    if chosen_nll is not None:
        metrics["nll_loss"] = chosen_nll.detach().mean().item()
    return loss, metrics


# ----------------------------- what the training loop calls: the reference once, then each micro-batch's loss

@torch.no_grad()
def reference_logps(model, pairs: list, pad_id: int, batch_size: int, share_prefix: bool = True) -> dict:
    """{pair id: (log πref(chosen), log πref(rejected))}, once, before the adapters (and their dropout) exist."""
    device = next(model.parameters()).device
    out = {}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        s = concatenated_forward(model, *make_batch(chunk, pad_id, device), share_prefix=share_prefix)
        for p, c, r in zip(chunk, s["chosen_logps"].tolist(), s["rejected_logps"].tolist()):
            out[p["id"]] = (c, r)
    return out


def batch_loss(model, pairs: list, reference: dict, pad_id: int, *, beta: float, sft_alpha: float,
               share_prefix: bool = True) -> tuple[torch.Tensor, dict]:
    """The SCL loss of a micro-batch of pairs and its metrics (means over the pairs)."""
    device = next(model.parameters()).device
    s = concatenated_forward(model, *make_batch(pairs, pad_id, device), share_prefix=share_prefix)
    ref_c, ref_r = torch.tensor([reference[p["id"]] for p in pairs], device=device).T  # (B,) each
    return dpo_loss(s["chosen_logps"], s["rejected_logps"], ref_c, ref_r, beta=beta, sft_alpha=sft_alpha,
                    chosen_nll=s["chosen_nll"])
