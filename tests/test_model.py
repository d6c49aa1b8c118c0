import pytest
import torch

from medqa.model import MedQALoRA, WarmupCosine


@pytest.mark.parametrize("checkpointing", [False, True])
def test_built_model_trains_in_train_mode_with_only_lora_trainable(medqa_cache, checkpointing):
    module = MedQALoRA(pretrained="builtin:tiny-llama", backend="hf", load_in_4bit=False, lora_r=4,
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
