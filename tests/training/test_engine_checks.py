"""radialog_rl.training.engines without launching anything: the DeepSpeed batch keys a loop without
a dataloader fills or checks, and the refusal of a run whose engine is not the launcher's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from radialog_rl.errors import ConfigError
from radialog_rl.training import engines


def fake_accelerator(kind=DistributedType.DEEPSPEED, processes=2, ds_config=None):
    plugin = SimpleNamespace(deepspeed_config=ds_config if ds_config is not None else {})
    return SimpleNamespace(distributed_type=kind, num_processes=processes, device=torch.device("cpu"),
                           state=SimpleNamespace(deepspeed_plugin=plugin), gradient_accumulation_steps=1)


def test_auto_keys_take_the_runs_values():
    acc = fake_accelerator(ds_config={"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                                      "zero_optimization": {"stage": 3}})
    engines.set_deepspeed_batch_keys(acc, micro_batch_size=4, gradient_accumulation_steps=3, max_grad_norm=None)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    # 4 rows per micro-batch x 3 accumulated x 2 processes = 24; no max_grad_norm: no clipping (0)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.0
    assert acc.gradient_accumulation_steps == 3
    assert engines.zero_stage(acc) == 3
    assert engines.describe_engine(acc) == "DEEPSPEED (ZeRO-3), 2 processes on cpu"


def test_a_disagreeing_key_is_named():
    acc = fake_accelerator(ds_config={"gradient_accumulation_steps": 2, "gradient_clipping": 1.0})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 2 but the run's gradient_accumulation_steps is 3"):
        engines.set_deepspeed_batch_keys(acc, 1, 3, max_grad_norm=1.0)
    acc = fake_accelerator(ds_config={"gradient_clipping": 1.0})
    with pytest.raises(ConfigError, match=r"gradient_clipping is 1.0 but the run's max_grad_norm \(unset"):
        engines.set_deepspeed_batch_keys(acc, 1, 3, max_grad_norm=None)


def test_a_deepspeed_launch_that_would_train_ddp_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="asked for deepspeed .* would train under MULTI_CPU, 2 processes"):
        engines.check_engine(fake_accelerator(DistributedType.MULTI_CPU))
    engines.check_engine(fake_accelerator(DistributedType.DEEPSPEED))  # what was asked: fine


def test_more_launched_processes_than_the_accelerator_sees_are_refused(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="started 2 processes but the accelerator sees 1"):
        engines.check_engine(fake_accelerator(DistributedType.NO, processes=1))


def test_a_policy_export_with_an_empty_tensor_is_refused(tmp_path):
    """What ZeRO-3 wrote before: (0,) placeholders instead of the partitioned weights."""
    from safetensors.torch import save_file

    from radialog_rl.errors import CheckpointError
    from radialog_rl.training.ppo.state import check_not_empty

    (tmp_path / "adapter").mkdir()
    save_file({"v_head.summary.weight": torch.ones(1, 4), "v_head.summary.bias": torch.zeros(1)},
              str(tmp_path / "value_head.safetensors"))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.ones(2, 4)},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    check_not_empty(tmp_path)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.empty(0)},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor base_model.model.lm_head.lora_A.weight is empty \(0,\)"):
        check_not_empty(tmp_path)


def test_the_engine_is_named_in_words_the_log_reader_knows():
    single = fake_accelerator(kind=DistributedType.NO, processes=1)
    assert engines.describe_engine(single) == "a single process (no distributed engine), 1 process on cpu"
    assert engines.describe_engine(fake_accelerator(kind=DistributedType.MULTI_CPU)) == "MULTI_CPU, 2 processes on cpu"
