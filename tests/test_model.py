import re
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medqa.model import MedQALoRA
from medqa.schedules import WarmupCosine

def answers(task: str = "pubmedqa") -> dict:
    """The tiny tokenizer's answer tokens, as the CLI links them from the data to the model."""
    from medqa.data import QADataModule

    return QADataModule(task=task, pretrained="builtin:tiny-llama").answer_tokens



@pytest.mark.parametrize("checkpointing", [False, True])
def test_built_model_trains_in_train_mode_with_only_lora_trainable(medqa_cache, checkpointing):
    module = MedQALoRA(pretrained="builtin:tiny-llama", backend="hf", load_in_4bit=False, dtype="float32", lora_r=4, answer_tokens=answers(),
                       gradient_checkpointing=checkpointing)
    module.configure_model()
    first = module.model
    module.configure_model()
    assert module.model is first  # idempotent
    # Lightning keeps the modes it finds: eval mode here would turn gradient checkpointing off.
    assert all(m.training for m in module.model.modules())
    assert module.model.get_base_model().is_gradient_checkpointing == checkpointing
    trainable = module.trainable_names()
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_warmup_cosine_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = WarmupCosine(opt, warmup=0.1, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=1e-6) and lrs[99] < 0.001
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # no increase after warm-up


def tiny_module(**kwargs) -> MedQALoRA:
    module = MedQALoRA(pretrained="builtin:tiny-llama", backend="hf", load_in_4bit=False, dtype="float32", lora_r=4, answer_tokens=answers(),
                       gradient_checkpointing=False, **kwargs)
    module.configure_model()
    return module


def checkpoint_of(module: MedQALoRA) -> dict:
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    return ckpt


def test_checkpoint_keeps_only_lora_and_names_its_base(medqa_cache):
    ckpt = checkpoint_of(tiny_module())
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])
    assert ckpt["medqa_base"]["name"] == "builtin:tiny-llama" and ckpt["medqa_base"]["hidden_size"] == 64
    tiny_module().on_load_checkpoint(ckpt)  # the same settings load


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["hyper_parameters"].update(lora_alpha=64), r"lora_alpha: checkpoint 64, this run 16"),
        (lambda c: c["hyper_parameters"].update(use_rslora=True), r"use_rslora: checkpoint True, this run False"),
        (lambda c: c["medqa_base"].update(name="Llama-3.1-8B"), r"base model name: checkpoint 'Llama-3.1-8B'"),
        (lambda c: c["medqa_base"].update(hidden_size=4096), r"base model hidden_size: checkpoint 4096, this run 64"),
        (lambda c: c["state_dict"].popitem(), r"0 weights only in the checkpoint.*1 only in the model"),
    ],
)
def test_mismatched_checkpoints_are_refused_naming_the_difference(medqa_cache, change, message):
    from medqa.model import CheckpointMismatch

    ckpt = checkpoint_of(tiny_module())
    change(ckpt)
    with pytest.raises(CheckpointMismatch, match=message):
        tiny_module().on_load_checkpoint(ckpt)


class PoisonOneBatch:
    """Sets one LoRA weight to NaN for training batch `at`, then puts it back."""

    def __init__(self, at: int) -> None:
        self.at, self.saved = at, None

    def hooks(self):
        import lightning as L

        poison = self

        class Hook(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == poison.at:
                    name = sorted(module.trainable_names())[0]
                    poison.param = module.get_parameter(name)
                    poison.saved = poison.param.detach().clone()
                    with torch.no_grad():
                        poison.param.fill_(float("nan"))

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if batch_idx == poison.at:
                    with torch.no_grad():
                        poison.param.copy_(poison.saved)

        return Hook()


def run_with_poison(tmp_path, nonfinite: str):
    import lightning as L

    from medqa.data import QADataModule

    module = MedQALoRA(pretrained="builtin:tiny-llama", backend="hf", load_in_4bit=False, dtype="float32", lora_r=4, answer_tokens=answers(),
                       gradient_checkpointing=False, nonfinite=nonfinite)
    data = QADataModule(source="synthetic", pretrained="builtin:tiny-llama", max_length=512, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=5, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=[PoisonOneBatch(at=2).hooks()])
    trainer.fit(module, datamodule=data)
    return module, trainer


def test_nonfinite_loss_stops_naming_step_and_questions(medqa_cache, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at step 2 \(epoch 0, batch 2\); questions in the batch: \d+, \d+, \d+, \d+"):
        run_with_poison(tmp_path, "error")


def test_nonfinite_loss_can_skip_the_batch(medqa_cache, tmp_path):
    module, trainer = run_with_poison(tmp_path, "skip")
    assert module.skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the NaN never reached the weights
    assert trainer.global_step == 5  # training went on to max_steps
    adam = trainer.optimizers[0].state
    assert {int(adam[p]["step"]) for p in module.parameters() if p.requires_grad} == {4}  # no update from the NaN batch


@torch.no_grad()
def test_a_padded_batch_scores_each_question_as_if_alone(medqa_cache, tokenizer):
    """Attention runs without the padding mask: right padding is invisible to real tokens."""
    from medqa.tokens import PromptFormat, collate
    from medqa.tasks.pubmedqa import synthetic_records

    module = tiny_module().eval()
    fmt = PromptFormat(tokenizer, "decision", 512)
    examples = [fmt.encode(r) for r in synthetic_records(6, seed=3)]
    assert len({len(e.input_ids) for e in examples}) > 1  # the batch really is padded
    loss, logp = module._forward(collate(examples, module.pad_id))
    alone = [module._forward(collate([e], module.pad_id)) for e in examples]
    torch.testing.assert_close(logp, torch.cat([lp for _, lp in alone]), atol=1e-5, rtol=1e-5)
    # The batch loss is the mean over all answer tokens of the batch.
    counts = torch.tensor([sum(t != -100 for t in e.labels[1:]) for e in examples], dtype=torch.float32)
    mean = sum(l * n for (l, _), n in zip(alone, counts)) / counts.sum()
    torch.testing.assert_close(loss, mean, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_an_untrained_adapter_scores_like_the_base_model(medqa_cache, tokenizer):
    """Zero-shot: validate / test without a checkpoint score the base model itself."""
    from medqa.tokens import PromptFormat, collate
    from medqa.tasks.pubmedqa import synthetic_records

    module = tiny_module().eval()
    fmt = PromptFormat(tokenizer, "decision", 512)
    batch = collate([fmt.encode(r) for r in synthetic_records(4, seed=1)], module.pad_id)
    _, with_adapter = module._forward(batch)
    with module.model.disable_adapter():
        _, base = module._forward(batch)
    torch.testing.assert_close(with_adapter, base, atol=0, rtol=0)


class HostWaits(TorchDispatchMode):
    """Counts the operations that make the host wait for the GPU (reading a value back, an
    output shape that depends on the data), except inside `decoder`'s forward: the backend's
    code, not medqa's."""

    WAITING = {"_local_scalar_dense", "is_nonzero", "equal", "_unique2", "unique_dim", "unique_consecutive",
               "bincount", "nonzero", "masked_select"}

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.ops, self.inside = Counter(), False
        decoder.register_forward_pre_hook(lambda *_: setattr(self, "inside", True))
        decoder.register_forward_hook(lambda *_: setattr(self, "inside", False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.WAITING and not self.inside:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def test_scoring_waits_for_the_gpu_once_a_stage_not_once_a_batch(medqa_cache):
    """Scoring's metric updates and label lookups make no per-batch host synchronisation
    (on an H200 they had made 11 a batch, 12% of scoring's wall time)."""
    import lightning as L

    from medqa.backends import decoder_and_head
    from medqa.data import QADataModule

    def waits(batches: int) -> Counter:
        module = tiny_module()
        data = QADataModule(source="synthetic", pretrained="builtin:tiny-llama", max_length=512, eval_batch_size=4)
        trainer = L.Trainer(accelerator="cpu", limit_test_batches=batches, logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        with HostWaits(decoder_and_head(module.model)[0]) as counter:
            trainer.test(module, datamodule=data, verbose=False)
        return counter.ops

    two, five = waits(2), waits(5)
    assert sum(two.values()) > 0  # the metrics' checks at the stage's end are seen: the counter works
    assert five == two, f"operations that wait for the GPU in every scoring batch: {dict(five - two)}"


def test_the_hf_backend_trains_in_4bit_on_the_cpu_and_takes_a_16bit_checkpoint(medqa_cache):
    """bitsandbytes runs NF4 on the CPU: the 4-bit path is tested here, not only on a GPU."""
    pytest.importorskip("bitsandbytes", reason="the dev extra installs bitsandbytes for the 4-bit path")
    from medqa.data import QADataModule
    from medqa.tokens import collate

    four = MedQALoRA(pretrained="builtin:tiny-llama", backend="hf", load_in_4bit=True, dtype="float32", lora_r=4,
                     answer_tokens=answers(), gradient_checkpointing=False)
    four.configure_model()
    base = four.model.get_base_model()
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert four.trainable_names() and all("lora_" in n for n in four.trainable_names())

    dm = QADataModule(source="synthetic", pretrained="builtin:tiny-llama", max_length=512)
    dm.setup("fit")
    batch = collate(dm.examples["train"][:4], dm.pad_id)
    before = {n: p.detach().clone() for n, p in four.named_parameters() if p.requires_grad}
    params = [p for p in four.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loss, _ = four._loss(batch)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in four.named_parameters() if p.requires_grad)

    sixteen = tiny_module()
    four.on_load_checkpoint(checkpoint_of(sixteen))  # the same base: its fingerprint agrees across 4-bit and 16-bit
    four.model.eval()
    with torch.no_grad():
        logp = four._forward(batch)[1]
    assert logp.shape == (4, 3) and torch.isfinite(logp).all()


@pytest.mark.parametrize("setting, value, expected", [("label_smoothing", 1.0, "in [0, 1)"),
                                                       ("label_smoothing", -0.1, "in [0, 1)"),
                                                       ("lora_dropout", 1.0, "in [0, 1)"), ("lora_layers", 0, "1 or more (or null: every layer)")])
def test_out_of_range_settings_are_refused_naming_the_option(setting, value, expected):
    from medqa.model import SettingsError

    with pytest.raises(SettingsError, match=rf"--model\.{setting} must be {re.escape(expected)}, got {value}"):
        MedQALoRA(pretrained="builtin:tiny-llama", answer_tokens=answers(), **{setting: value})
