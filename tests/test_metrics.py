import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medqa.tokens import PromptFormat, collate
from medqa.tasks.pubmedqa import synthetic_records
from medqa.metrics import StageScores, answer_loss, label_log_probs


@pytest.fixture(scope="module")
def llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)
    return LlamaForCausalLM(config).eval()


def hidden_fn(model):
    return lambda ids, mask: model.model(input_ids=ids, attention_mask=mask).last_hidden_state


def batch_of(tokenizer, n=5):
    fmt = PromptFormat(tokenizer, "decision", 512)
    return collate([fmt.encode(r) for r in synthetic_records(n)], pad_id=tokenizer.pad_token_id)


def whole_word_log_prob(model, prompt: list[int], word: list[int]) -> float:
    """Reference: one unpadded forward per (question, label), full vocabulary."""
    ids = torch.tensor([prompt + word])
    logp = model(ids).logits[0].log_softmax(-1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(word))


def scored_and_reference(llama, tokenizer, label_ids):
    """medqa's batched label scores, and per question the one-sequence-per-label reference."""
    batch = batch_of(tokenizer)
    hidden = hidden_fn(llama)(batch["input_ids"], batch["attention_mask"])
    got = label_log_probs(hidden_fn(llama), llama.lm_head, hidden, batch["input_ids"], batch["answer_pos"],
                          label_ids, tokenizer.pad_token_id)
    prompts = [batch["input_ids"][i, : batch["answer_pos"][i]].tolist() for i in range(len(batch["ids"]))]
    want = torch.tensor([[whole_word_log_prob(llama, p, w) for w in label_ids] for p in prompts])
    return got, want


@torch.no_grad()
def test_scoring_matches_whole_word_log_probs_with_a_multi_token_label(llama, tokenizer):
    label_ids = PromptFormat(tokenizer, "decision", 512).label_token_ids()
    assert max(len(ids) for ids in label_ids) > 1, "the tiny tokenizer should split one label word"
    got, want = scored_and_reference(llama, tokenizer, label_ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_single_token_labels_use_only_their_rows(llama, tokenizer):
    got, want = scored_and_reference(llama, tokenizer, [[11], [12], [13]])
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_answer_loss_equals_the_causal_lm_loss(llama, tokenizer):
    batch = batch_of(tokenizer)
    hidden = hidden_fn(llama)(batch["input_ids"], batch["attention_mask"])
    ours = answer_loss(hidden, llama.lm_head, batch["loss_pos"], batch["loss_targets"])
    reference = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, reference)


def test_stage_scores_against_hand_computed_values_over_batches_then_afresh():
    # truth:  yes yes yes no no maybe maybe
    # pred:   yes yes no  no yes maybe yes
    truth = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 0, 2, 0])
    logp = torch.full((7, 3), 0.1).scatter(1, pred[:, None], 0.8).log()  # the prediction at 0.8
    scores = StageScores("test", 3)
    for part in (slice(0, 3), slice(3, 4), slice(4, 7)):  # three batches, scored at the end
        scores.add(logp[part], truth[part])
    values, matrix = scores.compute()
    # yes: tp 2, fp 2, fn 1 -> P 1/2, R 2/3, F1 4/7;  no: tp 1, fp 1, fn 1 -> F1 1/2;
    # maybe: tp 1, fp 0, fn 1 -> P 1, R 1/2, F1 2/3
    f1 = torch.tensor([4 / 7, 1 / 2, 2 / 3])
    torch.testing.assert_close(values["test/acc"], torch.tensor(4 / 7))
    torch.testing.assert_close(values["test/f1"], f1)
    torch.testing.assert_close(values["test/macro_f1"], f1.mean())
    assert matrix.tolist() == [[2, 1, 0], [1, 1, 0], [1, 0, 1]]
    # every answer at confidence 0.8, right 4 times in 7: ECE |0.8 - 4/7|
    torch.testing.assert_close(values["test/ece"], torch.tensor(0.8 - 4 / 7))
    # The next epoch starts afresh: one right answer alone.
    scores.add(logp[:1], truth[:1])
    values, matrix = scores.compute()
    assert values["test/acc"] == 1 and matrix.sum() == 1


@torch.no_grad()
def test_weighted_answer_loss_weighs_each_example_as_told(llama, tokenizer):
    batch = batch_of(tokenizer)
    hidden = hidden_fn(llama)(batch["input_ids"], batch["attention_mask"])
    args = (hidden, llama.lm_head, batch["loss_pos"])
    per_example = []
    for i in range(len(batch["ids"])):  # each example's own mean over its answer tokens
        mine = batch["loss_pos"] // hidden.size(1) == i
        per_example.append((answer_loss(hidden, llama.lm_head, batch["loss_pos"][mine], batch["loss_targets"][mine]),
                            int(mine.sum())))
    weight = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0])
    want = sum(w * loss * n for w, (loss, n) in zip(weight, per_example)) / sum(w * n for w, (_, n) in zip(weight, per_example))
    torch.testing.assert_close(answer_loss(*args, batch["loss_targets"], weight), want)
    torch.testing.assert_close(answer_loss(*args, batch["loss_targets"], torch.ones(5)),
                               answer_loss(*args, batch["loss_targets"]))


@torch.no_grad()
def test_label_smoothing_moves_the_decision_targets_share_to_the_other_labels(llama, tokenizer):
    batch = batch_of(tokenizer)
    hidden = hidden_fn(llama)(batch["input_ids"], batch["attention_mask"])
    labels = torch.tensor([ids[0] for ids in PromptFormat(tokenizer, "decision", 512).label_token_ids()])
    t = hidden.size(1)
    decision = torch.arange(len(batch["ids"])) * t + batch["answer_pos"] - 1
    weight = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0])
    # By hand: a soft target at each decision token (0.9 gold, 0.05 each other label), one-hot elsewhere.
    logp = llama.lm_head(hidden.flatten(0, 1)[batch["loss_pos"]]).float().log_softmax(-1)
    target = torch.nn.functional.one_hot(batch["loss_targets"], logp.size(-1)).float()
    at = torch.isin(batch["loss_pos"], decision)
    assert int(at.sum()) == len(batch["ids"]) and bool(torch.isin(batch["loss_targets"][at], labels).all())
    for row in at.nonzero().flatten():
        target[row, labels] = 0.05
        target[row, batch["loss_targets"][row]] = 0.9
    w = weight[batch["loss_pos"] // t]
    want = ((-(target * logp).sum(-1)) * w).sum() / w.sum()
    got = answer_loss(hidden, llama.lm_head, batch["loss_pos"], batch["loss_targets"], weight, 0.1, labels, decision)
    torch.testing.assert_close(got, want)
    plain = answer_loss(hidden, llama.lm_head, batch["loss_pos"], batch["loss_targets"], weight)
    assert not torch.isclose(got, plain)
