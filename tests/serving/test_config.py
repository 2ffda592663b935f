import pytest

from serving.config import ConfigError, ServeConfig


def test_defaults_are_valid():
    cfg = ServeConfig()
    assert cfg.target == "cpu" and cfg.max_batch_size >= 1 and cfg.to_dict()["max_queue_delay_us"] == 0


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"target": "tpu"}, "serve.target"),
        ({"max_batch_size": 0}, "serve.max_batch_size"),
        ({"max_queue_delay_us": -1}, "serve.max_queue_delay_us"),
        ({"preferred_batch_sizes": (4, 64)}, "serve.preferred_batch_sizes"),
        ({"backbone_instances": 0}, "serve.backbone_instances"),
        ({"adapter_instances": 100}, "serve.adapter_instances"),
        ({"ort_threads": -2}, "serve.ort_threads"),
        ({"accuracy_level": 7}, "serve.accuracy_level"),
        ({"warmup_seq_len": 1}, "serve.warmup_seq_len"),
        ({"max_queue_size": 0}, "serve.max_queue_size"),
        ({"queue_timeout_us": 10}, "serve.queue_timeout_us"),
        ({"max_text_bytes": 8}, "serve.max_text_bytes"),
    ],
)
def test_invalid_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ServeConfig(**kwargs)


def test_preferred_batch_sizes_become_a_tuple():
    assert ServeConfig(preferred_batch_sizes=[2, 4]).preferred_batch_sizes == (2, 4)
