"""
chat_template.py: reading and checking chat JSONL, the one template, the loss mask, packing; and the turn markers
added to tokenizers and models that lack them.
"""
import json

import torch

from model import GPT, GPTConfig
from nanoforge import chat_template, training
from nanoforge.tokenizer import CharTokenizer, load_tokenizer

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ok"}]


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_bad_lines_are_reported_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": CONV},
        '{"messages": [',
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"prompt": "q", "completion": "  "},
        {"prompt": "q", "completion": "a"},
        {"text": "plain"},
        {"prompt": "q" * 500, "completion": "a"},
        {"prompt": "Z?", "completion": "a"},
    ])
    tok = chat_template.chat_tokenizer(CharTokenizer("abcdefghiklnoqrstyBx. "))
    X, Y, text, counts = chat_template.load_split(path, tok, block_size=64)
    assert counts["examples"] == 2 and counts["skipped"] == 6
    for line, what in [(2, "malformed JSON"), (3, "turn 1: unknown role 'robot'"), (4, "turn 2: empty assistant turn"),
                       (6, "needs 'messages'"), (7, "too long: 504 tokens > block_size 64"),
                       (8, "characters not in this model's vocabulary: '?Z'")]:
        assert f"d.jsonl:{line}: {what}" in text


def test_template_and_mask_count_only_assistant_turns_and_their_end():
    tok = chat_template.chat_tokenizer(load_tokenizer({"kind": "gpt2"}))
    ids, mask = chat_template.render(tok, CONV)
    assert tok.decode(ids) == ("<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>hello<|end|>"
                               "<|user|>bye<|end|><|assistant|>ok<|end|>")
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "hello<|end|>ok<|end|>"
    # the generation prompt is exactly the training prefix of the next assistant turn
    prompt, _ = chat_template.render(tok, CONV[:4], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt
    # text that spells a marker stays text
    ids, _ = chat_template.render(tok, [{"role": "user", "content": "<|end|>"}])
    assert ids.count(tok.special_tokens["<|end|>"]) == 1


def test_masked_loss_ignores_prompt_targets():
    """Changing the targets at prompt positions leaves the loss unchanged; changing an answer's does not."""
    tok = chat_template.chat_tokenizer(CharTokenizer("abcdefghijklmnopqrstuvwxyzB. "))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)).eval()
    ids, mask = chat_template.render(tok, CONV)
    x, y = chat_template.shift(ids, mask)
    loss = model(torch.tensor([x]), torch.tensor([y]))[1]
    prompt_pos = [i for i, m in enumerate(mask) if not m and i > 0]
    other = list(ids)
    for i in prompt_pos:
        other[i] = (other[i] + 7) % tok.vocab_size  # different tokens to predict at every prompt position
    _, y2 = chat_template.shift(other, mask)
    assert torch.equal(model(torch.tensor([x]), torch.tensor([y2]))[1], loss)
    answer = mask.index(1)
    other[answer] = (other[answer] + 7) % tok.vocab_size
    _, y3 = chat_template.shift(other, mask)
    assert model(torch.tensor([x]), torch.tensor([y3]))[1] != loss


def test_packing_keeps_every_example_whole_and_in_order():
    pairs = [([1] * n, [2] * n) for n in (5, 4, 3, 8, 1)]
    X, Y = chat_template.pack(pairs, block_size=8)
    rows = [x[x != 0].tolist() for x in X]
    assert [len(r) for r in rows] == [5, 7, 8, 1]  # 5 | 4+3 | 8 | 1: nothing cut, nothing reordered
    assert int((Y == 2).sum()) == 21 and bool((Y[X == 0] == -1).all())  # padding is never scored


def test_chat_tokens_extend_gpt2_and_char_tokenizers_and_reload_from_spec():
    for base in (load_tokenizer({"kind": "gpt2"}), CharTokenizer("ab")):
        tok = chat_template.chat_tokenizer(base)
        assert tok.vocab_size == base.vocab_size + 4
        assert [tok.special_tokens[t] for t in chat_template.CHAT_TOKENS] == list(range(base.vocab_size, tok.vocab_size))
        again = load_tokenizer(tok.spec)
        assert again.spec == tok.spec and again.special_tokens == tok.special_tokens
        assert chat_template.chat_tokenizer(tok) is tok  # nothing to add twice
        conv = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]
        assert again.decode(chat_template.render(again, conv)[0]) == "<|user|>ab<|end|><|assistant|>ba<|end|>"


def test_grow_vocab_keeps_old_logits_and_the_tie():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=10, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.tensor([[1, 2, 3]])
    before = model(idx, idx)[0]
    training.grow_vocab(model, 14)
    after = model(idx, idx)[0]
    assert after.shape[-1] == 14 and torch.allclose(after[..., :10], before)
    assert model.lm_head.weight is model.transformer.wte.weight and model.config.vocab_size == 14


def test_a_byte_order_mark_does_not_cost_the_first_example(tmp_path):
    # files saved by Windows editors start with a UTF-8 BOM; it is not part of the first line's JSON
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps({"prompt": "abc", "completion": "cab"}), json.dumps({"prompt": "bca", "completion": "a"})]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8"))
    tok = chat_template.chat_tokenizer(CharTokenizer("abc"))
    _, _, report, counts = chat_template.load_split(str(path), tok, block_size=64)
    assert counts["examples"] == 2 and counts["skipped"] == 0, report
