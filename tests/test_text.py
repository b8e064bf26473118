"""The prompt encoder: the tokenizer round-trips, explains its errors, cuts long prompts and maps unknown words
to [unk] with a warning (and loads a vocabulary saved before [unk] existed); the transformer gives one feature
per token, ignores padding, trains end to end and runs under bf16 autocast."""
import json
import warnings

import pytest
import torch

from ldm_scratch.config import TextEncoderConfig
from ldm_scratch.text import BOS_ID, PAD_ID, UNK, TextEncoder, Tokenizer

CAPTIONS = ["a red 7 on grass", "an orange 3 on plain", "a blue 0 on brick"]


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer.from_captions(CAPTIONS)


def make_encoder(tok: Tokenizer, **kw) -> TextEncoder:
    torch.manual_seed(0)
    cfg = TextEncoderConfig(vocab_size=tok.vocab_size, max_length=tok.max_length, dim=32, depth=2, num_heads=4, **kw)
    return TextEncoder(cfg)


def test_from_captions_vocab_and_length(tok):
    assert tok.words == sorted(tok.words) and "grass" in tok.words and "an" in tok.words
    assert tok.vocab_size == len(tok.words) + 3  # [pad], [bos], the words, [unk]
    assert tok.unk_id == tok.vocab_size - 1 and tok.itos[tok.unk_id] == UNK
    assert tok.max_length == 6  # five words + [bos]


def test_encode_decode_round_trip(tok):
    ids, mask = tok.encode(CAPTIONS + ["A  Red 7"])  # case and extra spaces are normalised
    assert ids.shape == mask.shape == (4, tok.max_length) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert (ids[:, 0] == BOS_ID).all()
    assert torch.equal(mask, ids != PAD_ID)
    assert mask[3].tolist() == [True] * 4 + [False] * 2
    assert tok.decode(ids) == CAPTIONS + ["a red 7"]
    assert tok.decode(ids[0]) == [CAPTIONS[0]]


def test_empty_prompt_is_bos_alone(tok):
    ids, mask = tok.encode("")
    assert ids.tolist() == [[BOS_ID] + [PAD_ID] * (tok.max_length - 1)]
    assert mask.sum().item() == 1 and mask[0, 0]
    assert tok.decode(ids) == [""]


def test_unknown_words_become_unk_with_one_warning_listing_them(tok):
    with pytest.warns(UserWarning) as record:
        ids, mask = tok.encode(["a red 7 on grass", "a purple 7 on pink", "a purple 0"])
    assert len(record) == 1  # one warning per call, every unknown word in it once
    msg = str(record[0].message)
    assert "['purple', 'pink']" in msg and UNK in msg and all(w in msg for w in tok.words)
    assert ids[1].tolist()[:6] == [BOS_ID, tok.stoi["a"], tok.unk_id, tok.stoi["7"], tok.stoi["on"], tok.unk_id]
    assert mask[1].all()  # [unk] is a real token: "7" stays at the position it was trained at
    assert tok.decode(ids[1:]) == ["a [unk] 7 on [unk]", "a [unk] 0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known words: no warning at all
        tok.encode(CAPTIONS)


def test_too_long_prompt_is_cut_with_a_warning_naming_it_and_the_limit(tok):
    with pytest.warns(UserWarning, match=r"longer than 5 words .* 'a red 7 on red grass'"):
        ids, _ = tok.encode(["a red 7 on red grass", "a red 7"])
    assert tok.decode(ids) == ["a red 7 on red", "a red 7"]  # the first max_length - 1 = 5 words


def test_a_tokenizer_saved_before_unk_keeps_its_ids_and_its_error(tok):
    """Old text_encoder/config.json files hold {"vocab", "max_length"}: no [unk], no embedding row for it."""
    old = Tokenizer.from_dict({"vocab": tok.words, "max_length": tok.max_length})
    assert old.unk_id is None and old.vocab_size == tok.vocab_size - 1  # its encoder's embedding table size
    assert torch.equal(old.encode(CAPTIONS)[0], tok.encode(CAPTIONS)[0])  # [unk] is last: word ids unchanged
    assert Tokenizer.from_dict(old.to_dict()) == old and old.to_dict()["unk"] is False
    with pytest.raises(ValueError) as e:
        old.encode(["a red 7 on grass", "a purple 7 on grass"])
    msg = str(e.value)
    assert "'purple'" in msg and all(w in msg for w in tok.words) and "without [unk]" in msg
    with pytest.warns(UserWarning, match="longer than 5 words"):  # cutting needs no new token: old ones do it too
        old.encode("a red 7 on red grass")


def test_non_string_prompts(tok):
    with pytest.raises(ValueError, match="string"):
        tok.encode(["a red 7", 7])
    with pytest.raises(ValueError):
        tok.encode(None)


def test_dict_round_trip_and_validation(tok):
    d = json.loads(json.dumps(tok.to_dict()))  # JSON-serialisable
    tok2 = Tokenizer.from_dict(d)
    assert tok2 == tok and tok2.to_dict() == tok.to_dict()
    assert torch.equal(tok2.encode(CAPTIONS)[0], tok.encode(CAPTIONS)[0])
    for bad in [None, {"vocab": ["a"]}, {"vocab": "abc", "max_length": 4}, {"vocab": ["a", 3], "max_length": 4},
                {"vocab": ["a", "a"], "max_length": 4}, {"vocab": ["a"], "max_length": 0},
                {"vocab": ["[pad]"], "max_length": 3}, {"vocab": ["a"], "max_length": 4, "extra": 1},
                {"vocab": ["[unk]"], "max_length": 3}, {"vocab": ["a"], "max_length": 4, "unk": "yes"}]:
        with pytest.raises(ValueError):
            Tokenizer.from_dict(bad)


def test_shapes_and_pooled(tok):
    enc = make_encoder(tok)
    ids, mask = tok.encode(CAPTIONS + [""])
    ctx = enc(ids, mask)
    assert ctx.shape == (4, tok.max_length, 32) and torch.isfinite(ctx).all()
    assert (ctx[~mask] == 0).all()  # pad positions carry nothing
    pooled = enc.pooled(ctx, mask)
    assert pooled.shape == (4, 32)
    assert torch.allclose(pooled[3], ctx[3, 0])  # "" pools to its one token, [bos]
    assert torch.allclose(pooled[0], ctx[0, mask[0]].mean(0))


def test_padding_does_not_change_real_tokens(tok):
    enc = make_encoder(tok).eval()
    ids, mask = tok.encode(CAPTIONS + ["a red 7", ""])
    ctx = enc(ids, mask)
    # Garbage ids under the padding: same outputs.
    noisy = torch.where(mask, ids, torch.randint(0, tok.vocab_size, ids.shape, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(enc(noisy, mask), ctx, atol=1e-6)
    # Fewer pads (a shorter L): same outputs on the real tokens.
    short_ids, short_mask = Tokenizer(tok.words, 4).encode(["a red 7", ""])
    short = enc(short_ids, short_mask)
    assert torch.allclose(short[short_mask], ctx[3:][mask[3:]], atol=1e-5)
    # Batch neighbours do not matter either.
    alone = enc(*tok.encode("a red 7"))
    assert torch.allclose(alone[0], ctx[3], atol=1e-5)


def test_gradient_reaches_embeddings(tok):
    enc = make_encoder(tok).train()
    ids, mask = tok.encode(CAPTIONS)
    enc(ids, mask).square().sum().backward()
    assert enc.token_emb.weight.grad is not None and enc.token_emb.weight.grad[ids[mask]].abs().sum() > 0
    assert enc.pos_emb.grad.abs().sum() > 0
    unused = sorted(set(range(tok.vocab_size)) - set(ids[mask].tolist()))
    assert enc.token_emb.weight.grad[unused].abs().sum() == 0  # a word absent from the batch gets nothing
    assert all(p.grad is not None for p in enc.parameters())


def test_bf16_autocast_close_to_fp32(tok):
    enc = make_encoder(tok).eval()
    ids, mask = tok.encode(CAPTIONS + [""])
    ref = enc(ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(ids, mask)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1  # bf16 keeps ~3 significant digits; LayerNorm output ~1


def test_bad_inputs_raise(tok):
    enc = make_encoder(tok)
    ids, mask = tok.encode(CAPTIONS)
    with pytest.raises(ValueError, match="0.."):
        enc(ids.clone().fill_(tok.vocab_size), mask)
    with pytest.raises(ValueError, match="bool mask"):
        enc(ids, mask.long())
    with pytest.raises(ValueError, match="max_length"):
        enc(torch.ones(1, tok.max_length + 1, dtype=torch.long), torch.ones(1, tok.max_length + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="integer ids"):
        enc(ids.float(), mask)
    with pytest.raises(ValueError, match="real token"):
        enc(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoder(TextEncoderConfig())


def test_context_feeds_the_unets_cross_attention(tok):
    """The contract with unet.py: (context, mask) is a valid `cond`, the empty prompt included."""
    import dataclasses
    from ldm_scratch.config import UNET_PRESETS, get_preset
    from ldm_scratch.unet import UNet
    enc = make_encoder(tok)
    ids, mask = tok.encode(["a red 7 on grass", ""])
    unet = UNet(dataclasses.replace(get_preset(UNET_PRESETS, "tiny"), context_dim=enc.cfg.dim))
    eps = unet(torch.randn(2, 1, 32, 32), torch.tensor([10, 500]), (enc(ids, mask), mask))
    assert eps.shape == (2, 1, 32, 32) and torch.isfinite(eps).all()
