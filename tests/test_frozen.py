"""LoRA on the top layers only (`--model.lora_layers`), and the frozen layers below it
computed once per question (`--model.cache_frozen`): the same states, the same training."""

import json

import pytest
import torch

from medqa.backends import BackendError, decoder_and_head
from medqa.frozen import FrozenLayers, run_layers

from test_cli import cli
from test_model import answers, tiny_module


def padded_batch(lengths: list[int], vocab: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def test_lora_on_the_top_layer_only(medqa_cache):
    module = tiny_module(lora_layers=1)
    decoder, _ = decoder_and_head(module.model)
    top = len(decoder.layers) - 1
    trainable = module.trainable_names()
    assert trainable and all(f".layers.{top}." in n for n in trainable)
    assert module.frozen is not None and module.frozen.split == top  # auto: computed once on hf


def test_the_split_forward_is_the_decoders_own(medqa_cache, tmp_path):
    """Cut in two at the split and put back together, the decoder gives its own hidden states at
    every real position of a right-padded batch; a second pass reads the states from disk."""
    module = tiny_module(lora_layers=1, cache_frozen=False)
    module.model.eval()
    decoder, _ = decoder_and_head(module.model)
    ids, mask = padded_batch([9, 17, 4])
    with torch.no_grad():
        want = decoder(input_ids=ids, attention_mask=None, use_cache=False)[0]
        frozen = FrozenLayers.for_model(decoder, 1, tmp_path)
        got = frozen.hidden_states(ids, mask)
        assert (frozen.computed, frozen.read) == (3, 0)
        again = frozen.hidden_states(ids, mask)
        assert (frozen.computed, frozen.read) == (3, 3)
        whole = run_layers(decoder, decoder.embed_tokens(ids), decoder.layers)
    for i, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(got[i, :n], want[i, :n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again[i, :n], got[i, :n], rtol=0, atol=0)
        torch.testing.assert_close(decoder.norm(whole)[i, :n], want[i, :n], rtol=1e-5, atol=1e-6)
    assert len(list(frozen.folder.glob("*.safetensors"))) == 3


def test_the_last_layer_at_the_read_rows_alone_gives_the_same_values_and_gradients(medqa_cache, tmp_path):
    """With `rows`, the last layer runs only there: the same hidden states at those rows as the
    whole layer gives, zeros elsewhere, and the same LoRA gradients from a loss read there."""
    module = tiny_module(lora_layers=2, cache_frozen=False)
    decoder, head = decoder_and_head(module.model)
    frozen = FrozenLayers(decoder, 0, None)  # every layer above the split: the layer below the last one trains too
    ids, mask = padded_batch([9, 17, 4])
    time = ids.size(1)
    rows = torch.tensor([0 * time + 7, 0 * time + 8, 1 * time + 3, 1 * time + 16, 2 * time + 3])
    grads = []
    for read in (None, rows):
        module.model.zero_grad()
        hidden = frozen.hidden_states(ids, mask, read)
        head(hidden.flatten(0, 1)[rows]).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad})
        if read is None:
            whole = hidden.detach()
        else:
            part = hidden.detach()
    flat_whole, flat_part = whole.flatten(0, 1), part.flatten(0, 1)
    torch.testing.assert_close(flat_part[rows], flat_whole[rows], rtol=1e-5, atol=1e-6)
    others = torch.ones(flat_part.size(0), dtype=torch.bool)
    others[rows] = False
    assert not flat_part[others].any()
    assert grads[0].keys() == grads[1].keys() and any(".layers.0." in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_damaged_or_foreign_states_are_computed_again(medqa_cache, tmp_path):
    module = tiny_module(lora_layers=1, cache_frozen=False)
    decoder, _ = decoder_and_head(module.model)
    ids, mask = padded_batch([6, 11])
    frozen = FrozenLayers.for_model(decoder, 1, tmp_path)
    with torch.no_grad():
        want = frozen.hidden_states(ids, mask)
    files = sorted(frozen.folder.glob("*.safetensors"))
    damaged = bytearray(files[0].read_bytes())
    damaged[-3] ^= 0xFF  # a value changed: its digest no longer matches
    files[0].write_bytes(bytes(damaged))
    files[1].write_bytes(files[1].read_bytes()[:40])  # cut short
    again = FrozenLayers.for_model(decoder, 1, tmp_path)
    with torch.no_grad():
        got = again.hidden_states(ids, mask)
    assert (again.computed, again.read) == (2, 0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Rewritten whole: a third reader takes them from disk.
    third = FrozenLayers.for_model(decoder, 1, tmp_path)
    with torch.no_grad():
        third.hidden_states(ids, mask)
    assert (third.computed, third.read) == (0, 2)


def test_the_states_folder_is_named_by_the_frozen_weights(medqa_cache, tmp_path):
    module = tiny_module(lora_layers=1, cache_frozen=False)
    decoder, _ = decoder_and_head(module.model)
    first = FrozenLayers.for_model(decoder, 1, tmp_path).folder
    assert FrozenLayers.for_model(decoder, 1, tmp_path).folder == first
    with torch.no_grad():
        decoder.layers[1].mlp.up_proj.base_layer.weight[0, 0] += 1  # above the split: same frozen layers
    assert FrozenLayers.for_model(decoder, 1, tmp_path).folder == first
    with torch.no_grad():
        decoder.layers[0].mlp.up_proj.weight[0, 0] += 1  # below: other states
    assert FrozenLayers.for_model(decoder, 1, tmp_path).folder != first


def test_cache_frozen_true_is_refused_where_nothing_is_frozen(medqa_cache):
    with pytest.raises(BackendError, match=r"--model.cache_frozen true: there are no frozen layers .* \(set --model.lora_layers\)"):
        tiny_module(cache_frozen=True)


@pytest.mark.slow
def test_training_with_the_states_computed_once_is_the_same_training(tmp_path):
    """Two epochs of the demo with LoRA on the top layer: the frozen layer computed once (and read
    back in the second epoch, and by the test that follows) or in every step give the same weights
    and scores; the adapter names the layer it holds."""
    runs = {}
    for setting in ("true", "false"):
        logs = tmp_path / setting
        cli("fit", "--model.lora_layers", "1", "--model.cache_frozen", setting, "--trainer.max_epochs", "2",
            "--trainer.limit_train_batches", "6", "--test_after_fit", "last", logs=logs)
        runs[setting] = logs / "demo" / "fit-0"
    want = torch.load(runs["false"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    got = torch.load(runs["true"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert want.keys() == got.keys() and all(".layers.1." in k for k in got)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=2e-6, msg=name)  # weights of about 0.1
    scores = {k: json.loads((r / "metrics.json").read_text()) for k, r in runs.items()}
    assert scores["true"]["test/acc"] == scores["false"]["test/acc"]
    assert scores["true"]["test/macro_f1"] == pytest.approx(scores["false"]["test/macro_f1"], abs=1e-6)
    config = json.loads(next((runs["true"] / "checkpoints").glob("last.adapter")).joinpath("adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]


@pytest.mark.slow
def test_best_passes_over_runs_of_another_lora_layers(tmp_path):
    cli("fit", "--model.lora_layers", "1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        logs=tmp_path)
    with pytest.raises(Exception, match="no best checkpoint of a run with this command's task and model settings"):
        cli("validate", "--ckpt_path", "best", logs=tmp_path)
    cli("validate", "--ckpt_path", "best", "--model.lora_layers", "1", logs=tmp_path)


@pytest.mark.slow
def test_a_checkpoint_of_other_lora_layers_is_refused(tmp_path):
    from medqa.model import CheckpointMismatch

    cli("fit", "--model.lora_layers", "1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        logs=tmp_path)
    last = tmp_path / "demo" / "fit-0" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointMismatch, match="lora_layers: checkpoint 1, this run None"):
        cli("validate", "--ckpt_path", str(last), logs=tmp_path)


def test_module_answers_identically_with_and_without_the_frozen_cache(medqa_cache):
    """Scoring (the label words' log-probs) through the frozen cache equals the plain forward."""
    on, off = tiny_module(lora_layers=1), tiny_module(lora_layers=1, cache_frozen=False)
    off.load_state_dict(on.state_dict(), strict=False)
    ids, mask = padded_batch([12, 7, 9])
    batch = {"input_ids": ids, "attention_mask": mask, "answer_pos": mask.sum(1) - 1,
             "loss_pos": torch.tensor([11, 12 + 6]), "loss_targets": torch.tensor([5, 6]), "label": torch.tensor([0, 1, 2])}
    for m in (on, off):
        m.model.eval()
    with torch.no_grad():
        (loss_on, logp_on), (loss_off, logp_off) = on._forward(batch), off._forward(batch)
    torch.testing.assert_close(logp_on, logp_off, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-6)
    assert answers()["labels"] == on.labels
