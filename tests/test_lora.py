"""LoRA by hand: starts at the base model, trains only adapters, switches off to the reference, merges
into a plain checkpoint that transformers loads.

Run: python -m pytest -q tests/test_lora.py      (CPU, tiny random LLaVA; transformers for one check)
"""
import pytest
import torch
import torch.nn as nn

from scl.config import TextConfig, VisionConfig, VLMConfig
from scl.lora import LoRALinear, add_lora, lora_parameters, merge_lora
from scl.vlm import VLM

V, IMAGE = 64, 63  # vocab, image token id


def tiny_model(seed=0):
    torch.manual_seed(seed)
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=4)
    text = TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return VLM(VLMConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)).float().eval()


def inputs(model, B=2, T_text=12, seed=0):
    """input_ids (B, 1 + P + T_text) with one image per row, pixel_values (B, 3, 16, 16)."""
    g = torch.Generator().manual_seed(seed)
    P = model.config.num_image_tokens
    text = torch.randint(3, IMAGE, (B, T_text), generator=g)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), torch.full((B, P), IMAGE), text], 1)
    return ids, torch.randn(B, 3, 16, 16, generator=g)


def train_steps(model, params, n=2):
    """A few AdamW steps on next-token loss; lr large enough that every adapter moves visibly."""
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(n):
        ids, pix = inputs(model, seed=step)
        logits = model(ids[:, :-1], pix)  # (B, T-1, V)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def test_adapters_only_on_llm_qkv_and_only_they_train():
    model = tiny_model()
    names_before = list(model.state_dict())
    params = add_lora(model, r=4, alpha=8, dropout=0.0)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == [f"language_model.model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"]
    assert isinstance(model.vision_tower.encoder.layers[0].self_attn.q_proj, nn.Linear)  # LLaVA's own code adapted the tower by mistake
    assert [p for p in model.parameters() if p.requires_grad] == params == lora_parameters(model)
    assert params[0].shape == (4, 32) and params[1].shape == (32, 4)  # A (r, in), B (out, r)
    # base names are unchanged; adapters are added beside them
    new = [n for n in model.state_dict() if n not in names_before]
    assert set(names_before) <= set(model.state_dict())
    assert all(n.endswith((".lora_A", ".lora_B")) for n in new) and len(new) == 12
    with pytest.raises(ValueError, match="already"):
        add_lora(model)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, params, n=2)  # step 1 moves only B (A's gradient is B^T·… = 0); step 2 moves A too
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == ("lora_" in n), n


def test_zero_init_is_the_base_model_and_training_moves_it():
    model = tiny_model()
    ids, pix = inputs(model)
    with torch.no_grad():
        base = model(ids, pix)
    params = add_lora(model, r=4, alpha=8, dropout=0.05)
    assert all(not m.training for m in model.modules())  # eval model: adapter dropout off too
    with torch.no_grad():
        assert torch.equal(model(ids, pix), base)  # B = 0: exactly the base model
    train_steps(model, params)
    with torch.no_grad():
        tuned = model(ids, pix)
    assert (tuned - base).abs().max() > 1e-3  # training did something


def test_dropout_on_the_adapter_input_in_train_mode_only():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(lin.lora_B)
    x = torch.randn(3, 16)
    lin.train()
    assert not torch.equal(lin(x), lin(x))
    lin.eval()
    base = nn.functional.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(lin(x), base + 2.0 * x @ lin.lora_A.T @ lin.lora_B.T)  # scale = 8/4


@pytest.mark.parametrize("kind", ["clip_llama", "siglip_qwen2"])  # untied head / tied + q/k/v biases
def test_merge_gives_the_adapted_model_as_a_plain_checkpoint(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    import hf_fixtures as hx
    from scl.weights import load_vlm, save_vlm

    src, hf_config = hx.make_llava_checkpoint(tmp_path, kind)
    model = load_vlm(src)
    names = list(model.state_dict())
    ids, mask, pix = hx.make_batch(hf_config, seed=5)
    with torch.no_grad():
        before = model(ids, pix, attention_mask=mask)
    params = add_lora(model, r=4, alpha=8, dropout=0.05)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
    for seed in range(2):
        ids, mask, pix = hx.make_batch(hf_config, seed=seed)
        logits = model(ids[:, :-1], pix, attention_mask=mask[:, :-1])  # (B, T-1, V)
        nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    ids, mask, pix = hx.make_batch(hf_config, seed=5)
    with torch.no_grad():
        tuned = model(ids, pix, attention_mask=mask)
        assert (tuned - before).abs().max() > 1e-3  # the adapters moved the model
        merge_lora(model)
        merged = model(ids, pix, attention_mask=mask)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.language_model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert list(model.state_dict()) == names
    torch.testing.assert_close(merged, tuned, atol=1e-5, rtol=0)

    out = tmp_path / "merged"
    save_vlm(model, out)
    with torch.no_grad():
        torch.testing.assert_close(load_vlm(out)(ids, pix, attention_mask=mask), merged, atol=0, rtol=0)
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation="sdpa", dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    real = mask.bool()  # left-pad rows are garbage in both models; compare real tokens
    with torch.no_grad():
        hf_logits = hf.eval()(input_ids=ids, attention_mask=mask, pixel_values=pix,
                       position_ids=hx.hf_position_ids(mask)).logits.float()
    torch.testing.assert_close(hf_logits[real], merged[real], atol=1e-4, rtol=0)


def test_bf16_base_trains_fp32_adapters_and_merges_in_fp32():
    """A bf16 model: adapters, their gradients and AdamW's state are fp32; outputs keep the base dtype;
    merge_lora rounds W + (α/r)·B·A to bf16 once, so the merged model equals the adapted one to bf16
    precision (not exactly: the update is below bf16's resolution in places)."""
    model = tiny_model().to(torch.bfloat16)
    ids, pix = inputs(model, seed=9)
    with torch.no_grad():
        before = model(ids, pix.bfloat16())
    params = add_lora(model, r=4, alpha=8, dropout=0.0)
    assert all(p.dtype == torch.float32 for p in params)
    q = model.language_model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(3):
        ids, pix = inputs(model, seed=step)
        logits = model(ids[:, :-1], pix.bfloat16())  # (B, T-1, V) fp32
        nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        assert all(p.grad.dtype == torch.float32 for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(s.dtype == torch.float32 for st in opt.state.values() for s in st.values() if s.dim())
    model.eval()
    x = torch.randn(5, 32).bfloat16()
    assert q(x).dtype == torch.bfloat16
    # The adapter term is computed in fp32 from x·Aᵀ and added once.
    a = nn.functional.linear(x, q.lora_A.bfloat16()).float()
    want = (nn.functional.linear(x, q.weight, q.bias) + (a @ q.lora_B.T * q.scale).bfloat16())
    torch.testing.assert_close(q(x), want, atol=0, rtol=0)
    # The merge is the fp32 sum, rounded once.
    exact = (q.weight.float() + q.scale * q.lora_B @ q.lora_A).bfloat16()
    assert torch.equal(q.merged_weight(), exact)
    ids, pix = inputs(model, seed=9)
    with torch.no_grad():
        tuned = model(ids, pix.bfloat16())
        assert (tuned - before).abs().max() > 1e-2  # the adapters moved the model
        merge_lora(model)
        merged = model(ids, pix.bfloat16())
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged, tuned, atol=0.05, rtol=0.02)  # bf16 rounding of the merged weight
