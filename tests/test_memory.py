"""`--model.gradient_checkpointing auto`: the plan for a card, and the step down after an
out-of-memory error in training (simulated on the CPU by a layer that raises it)."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from medqa.memory import (GiB, MARGIN_BYTES, MicroBatch, TrainingOutOfMemory, activation_bytes_per_token, choose, fallback,
                          grow, micro_batches)
from medqa.model import MedQALoRA, SettingsError

def answers(task: str = "pubmedqa") -> dict:
    """The tiny tokenizer's answer tokens, as the CLI links them from the data to the model."""
    from medqa.data import QADataModule

    return QADataModule(task=task, pretrained="builtin:tiny-llama").answer_tokens



def test_llama_8b_layer_estimate_covers_the_measured_activations():
    """Measured on one H200 (8B shape, longest batch about 5,840 tokens): 0.62 GiB a kept
    layer. The estimate must not fall below it (a plan that does not fit would run out of
    memory) nor waste more than a fifth of it (fewer layers kept than could be)."""
    class Config:
        hidden_size, intermediate_size = 4096, 14336

    per_layer = activation_bytes_per_token(Config) * 5_840 / GiB
    assert 0.62 <= per_layer <= 0.62 * 1.2


@pytest.mark.parametrize("free_gib, kept", [(139, 32), (10, 0), (20, 16)])
def test_plan_keeps_the_layers_that_fit(free_gib, kept):
    """8B shape: 0.5 GiB a kept layer, 8 GiB for everything else; 90% of the free memory
    less 2 GiB is usable."""
    plan = choose(32, GiB // 2, 8 * GiB, free_gib * GiB)
    assert plan.kept == kept
    assert plan.estimate_bytes <= free_gib * GiB * 0.9 - MARGIN_BYTES or kept == 0
    assert len(plan.kept_layers()) == kept and len(set(plan.kept_layers())) == kept
    assert all(0 <= i < 32 for i in plan.kept_layers())
    if kept == 16:  # spread over the stack, not the first sixteen
        assert plan.kept_layers() == list(range(1, 32, 2))
        assert "16 of 32 layers keep their activations, the other 16 are recomputed" in plan.describe()


def test_a_memory_limit_below_the_free_memory_sizes_the_plan_and_is_named():
    """A 24 GiB limit on a 139 GiB card plans as a 24 GiB card would, and says so; a limit
    above the free memory changes nothing."""
    limited = choose(32, GiB // 2, 8 * GiB, 139 * GiB, limit_bytes=24 * GiB)
    assert limited.kept == choose(32, GiB // 2, 8 * GiB, 24 * GiB).kept == 23  # (24 x 0.9 - 2 - 8) / 0.5
    assert limited.limited and "of 24.0 GiB allowed by --model.memory_limit_gib" in limited.describe()
    assert fallback(limited).limited  # stepping down keeps saying what it planned for
    roomy = choose(32, GiB // 2, 8 * GiB, 20 * GiB, limit_bytes=100 * GiB)
    assert roomy == choose(32, GiB // 2, 8 * GiB, 20 * GiB) and "the card had free" in roomy.describe()


def test_a_memory_limit_must_be_positive(medqa_cache):
    with pytest.raises(SettingsError, match=r"--model.memory_limit_gib must be above 0, got 0"):
        MedQALoRA(memory_limit_gib=0, answer_tokens=answers())


def test_with_no_memory_figure_every_layer_keeps_its_activations():
    plan = choose(2, 10**6, 0, None)
    assert plan.kept == 2 and "no memory limit could be read" in plan.describe()


def test_fallback_halves_then_recomputes_everything():
    plan, seen = choose(32, GiB // 2, 8 * GiB, 139 * GiB), []
    while plan is not None:
        seen.append(plan.kept)
        plan = fallback(plan)
    assert seen == [32, 16, 8, 4, 2, 1, 0]


class OutOfMemoryWhileKept(L.Callback):
    """Raises CUDA's out-of-memory error from every decoder layer that runs in training
    without recomputation (as a card too small for the plan would), or from every layer
    when `always`: in its forward, or in backward (`where`), from training batch `first` on."""

    def __init__(self, always: bool = False, where: str = "forward", first: int = 0) -> None:
        self.always, self.where, self.first, self.raised, self.batch = always, where, first, 0, -1

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batch = batch_idx

    def _oom(self, *_):
        self.raised += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    def on_train_start(self, trainer, module):
        from medqa.backends import decoder_and_head

        def armed(layer):
            return torch.is_grad_enabled() and self.batch >= self.first and (self.always or not layer.gradient_checkpointing)

        def before(layer, args):
            if self.where == "forward" and armed(layer):
                self._oom()

        def after(layer, args, output):
            if self.where == "backward" and armed(layer):
                (output[0] if isinstance(output, tuple) else output).register_hook(self._oom)

        for layer in decoder_and_head(module.model)[0].layers:
            layer.register_forward_pre_hook(before)
            layer.register_forward_hook(after)


def fit(tmp_path, checkpointing, callbacks=(), accumulate=1, grow=True, steps=3, ckpt_path=None, bucket_batches=16,
        memory_limit_gib=None):
    from medqa.data import QADataModule

    torch.manual_seed(0)
    module = MedQALoRA(pretrained="builtin:tiny-llama", backend="hf", load_in_4bit=False, dtype="float32", lora_r=4, answer_tokens=answers(),
                       gradient_checkpointing=checkpointing, grow_micro_batch=grow, memory_limit_gib=memory_limit_gib)
    data = QADataModule(source="synthetic", pretrained="builtin:tiny-llama", max_length=512, batch_size=4,
                        bucket_batches=bucket_batches)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=list(callbacks), accumulate_grad_batches=accumulate)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_steps_down_and_trains_as_the_smaller_plan_would(medqa_cache, tmp_path, caplog, where):
    """The error comes in the second of the step's two accumulated batches: the first's
    gradients must survive the retry."""
    oom = OutOfMemoryWhileKept(where=where, first=1)
    module, trainer = fit(tmp_path, "auto", [oom], accumulate=2)
    assert trainer.global_step == 3 and oom.raised == 2  # batch 1 twice (2 layers kept, then 1)
    assert module.plan.kept == 0
    assert "Out of GPU memory at step 0" in caplog.text
    assert "retrying the batch with every layer recomputed in backward" in caplog.text
    recomputed, _ = fit(tmp_path, True, accumulate=2)  # the plan it ended on, from the start
    ours, theirs = module.state_dict(), recomputed.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours if ".lora_" in k)


def test_out_of_memory_with_nothing_left_to_recompute_says_what_to_change(medqa_cache, tmp_path):
    with pytest.raises(TrainingOutOfMemory, match=r"out of GPU memory at step 0 with every layer's activations "
                                                  r"recomputed: lower --data.batch_size .* \(CUDA out of memory"):
        fit(tmp_path, "auto", [OutOfMemoryWhileKept(always=True)])
    with pytest.raises(TrainingOutOfMemory, match=r"with --model.gradient_checkpointing false: .* or pass "
                                                  r"--model.gradient_checkpointing auto"):
        fit(tmp_path, False, [OutOfMemoryWhileKept()])


def test_auto_plan_is_chosen_for_the_longest_training_batch(medqa_cache, tmp_path, caplog):
    """Without a GPU, for the machine's available memory and what a layer of this model keeps
    (measured: `medqa.memory_cpu`)."""
    from medqa.backends import decoder_and_head
    from medqa.memory_cpu import ALLOCATOR_OVERHEAD, saved_bytes_per_token

    module, _ = fit(tmp_path, "auto")
    assert module.plan.kept == module.plan.layers and module.plan.cpu  # a tiny model fits any machine
    lengths = sorted((len(e.input_ids) for e in module.trainer.datamodule.examples["train"]), reverse=True)
    decoder, _ = decoder_and_head(module.model)
    per_token = saved_bytes_per_token(decoder.layers[0], 64, torch.float32, decoder.rotary_emb)
    assert module.plan.per_layer_bytes == int(per_token * ALLOCATOR_OVERHEAD) * 4 * lengths[0]  # 4 of the longest
    assert "Gradient checkpointing auto: no recomputation" in caplog.text and "GiB of available memory" in caplog.text
    with pytest.raises(ValueError, match="gradient_checkpointing must be true, false or auto, got sometimes"):
        MedQALoRA(gradient_checkpointing="sometimes")


def test_kept_layers_run_once_and_recomputed_layers_twice(medqa_cache, tokenizer):
    """The plan's flags really choose the layers: a recomputed layer's forward runs again in
    backward, a kept one's does not."""
    from medqa.backends import decoder_and_head, keep_activations
    from medqa.tokens import PromptFormat, collate
    from medqa.tasks.pubmedqa import synthetic_records

    module = MedQALoRA(pretrained="builtin:tiny-llama", backend="hf", load_in_4bit=False, dtype="float32", lora_r=4, answer_tokens=answers(),
                       gradient_checkpointing=True)
    module.configure_model()
    layers = decoder_and_head(module.model)[0].layers
    assert len(layers) >= 2
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    keep_activations(module.model, [1])
    fmt = PromptFormat(tokenizer, "decision", 512)
    batch = collate([fmt.encode(r) for r in synthetic_records(2, seed=1)], tokenizer.pad_token_id)
    module._loss(batch)[0].backward()
    assert calls[1] == 1 and all(c == 2 for i, c in enumerate(calls) if i != 1)


def test_micro_batches_keep_the_questions_of_an_optimizer_step():
    assert micro_batches(8, 4) == [(32, 1), (16, 2), (8, 4)]
    assert micro_batches(8, 3) == [(24, 1), (8, 3)]
    assert micro_batches(4, 1) == [(4, 1)]


@pytest.mark.parametrize("card_gib, accumulate, expected", [(139, 4, 32), (139, 2, 16), (80, 4, 16), (24, 2, 8)])
def test_grow_takes_the_largest_micro_batch_that_keeps_every_layer(card_gib, accumulate, expected):
    """The 8B shape on PQA-L (longest example 730 tokens), 8 GiB in use after loading: on an
    H200 8 x 4 becomes 32 x 1, on an 80 GiB card 16 x 2; on a 24 GiB card not even 8 keeps
    every layer, so the configured 8 stays with its partial plan."""
    per_token = activation_bytes_per_token(SimpleNamespace(hidden_size=4096, intermediate_size=14336))

    def plan(micro):
        return choose(32, per_token * micro * 730, 8 * GiB, card_gib * GiB)

    micro, steps, chosen = grow(8, accumulate, plan)
    assert (micro, steps) == (expected, 8 * accumulate // expected)
    assert chosen == plan(micro)
    assert chosen.kept == chosen.layers if expected > 8 else 0 < chosen.kept < chosen.layers


class Grown(MicroBatch):
    """The choice a card with room for `micro` questions makes (no GPU here to measure)."""

    def __init__(self, micro: int) -> None:
        super().__init__()
        self.micro = micro

    def choose(self, trainer, pl_module) -> int:
        return self.micro


def lora_weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


class StepLosses(L.Callback):
    """Each optimizer step's training loss: the sum of its batches' losses, which Lightning has
    divided by the batches accumulated."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = batch_idx // trainer.accumulate_grad_batches
        self.losses[step] = self.losses.get(step, 0.0) + float(outputs["loss"])


def test_a_grown_micro_batch_trains_the_same_steps_and_resumes_on_it(medqa_cache, tmp_path, caplog):
    """4 x 2 grown to 8 x 1 takes the same 8 questions an optimizer step (unbucketed order),
    with the same loss at every step, to the same weights; a resume from its checkpoint keeps
    8 x 1, on a machine that would not grow it, and ends where the uninterrupted run does."""
    configured_losses, grown_losses = StepLosses(), StepLosses()
    configured, trainer = fit(tmp_path, "auto", [configured_losses], accumulate=2, grow=False, bucket_batches=0)
    assert (trainer.datamodule.batch_size, trainer.accumulate_grad_batches) == (4, 2)
    grown, trainer = fit(tmp_path, "auto", [Grown(8), grown_losses], accumulate=2, grow=False, bucket_batches=0)
    assert (trainer.datamodule.batch_size, trainer.accumulate_grad_batches, trainer.global_step) == (8, 1, 3)
    assert "Micro-batch auto: 8 questions x 1 accumulated (configured 4 x 2, the same 8 an optimizer step)" in caplog.text
    assert len(grown_losses.losses) == 3 and grown_losses.losses.keys() == configured_losses.losses.keys()
    for step, loss in grown_losses.losses.items():
        assert loss == pytest.approx(configured_losses.losses[step], rel=1e-5), step
    assert len(set(grown_losses.losses.values())) == 3  # the steps trained: each loss differs
    ours, theirs = lora_weights(grown), lora_weights(configured)
    assert ours.keys() == theirs.keys() and ours
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)

    class SaveAtStep2(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            if trainer.global_step == 2 and not (tmp_path / "step2.ckpt").exists():
                trainer.save_checkpoint(tmp_path / "step2.ckpt")

    fit(tmp_path, "auto", [Grown(8), SaveAtStep2()], accumulate=2, grow=False, bucket_batches=0)
    resumed, trainer = fit(tmp_path, "auto", accumulate=2, ckpt_path=tmp_path / "step2.ckpt", bucket_batches=0)  # MicroBatch: no GPU
    assert (trainer.datamodule.batch_size, trainer.accumulate_grad_batches, trainer.global_step) == (8, 1, 3)
    ours = lora_weights(resumed)
    assert all(torch.allclose(ours[k], lora_weights(grown)[k], atol=1e-6) for k in ours)


def test_without_a_gpu_the_micro_batch_stays_as_configured(medqa_cache, tmp_path):
    module, trainer = fit(tmp_path, "auto", accumulate=2)
    assert any(isinstance(c, MicroBatch) for c in trainer.callbacks)
    assert (trainer.datamodule.batch_size, trainer.accumulate_grad_batches) == (4, 2)
    _, trainer = fit(tmp_path, True, accumulate=2)
    assert not any(isinstance(c, MicroBatch) for c in trainer.callbacks)  # only `auto` grows it


def test_a_checkpoint_cannot_set_a_micro_batch_outside_the_configured_step(medqa_cache, tmp_path):
    """The saved choice is untrusted: only a micro-batch that divides the configured step's
    questions is taken back; anything else leaves the configured pair (and the sampler's
    check then names what differs)."""
    _, trainer = fit(tmp_path, "auto", accumulate=2, steps=1)
    callback = next(c for c in trainer.callbacks if isinstance(c, MicroBatch))
    for hostile in ({"configured": [4, 2], "chosen": [10**9, 0]}, {"configured": [4, 2], "chosen": [True, 1]},
                    {"configured": [4, 2], "chosen": "8"}, {"configured": [2, 4], "chosen": [8, 1]}, ["x"]):
        callback.load_state_dict(hostile)
        assert (trainer.datamodule.batch_size, trainer.accumulate_grad_batches) == (4, 2), hostile
    callback.load_state_dict({"configured": [4, 2], "chosen": [8, 1]})
    assert (trainer.datamodule.batch_size, trainer.accumulate_grad_batches) == (8, 1)
