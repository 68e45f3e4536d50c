"""The workarounds in toolkit/compat.py are still needed, and hide nothing else."""

import warnings

import torch.distributed as dist

from toolkit.compat import silence_known_library_warnings


def test_torch_still_warns_about_all_gather_into_tensor(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        import torch

        out = torch.empty(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dist.all_gather_into_tensor(out, torch.ones(2))
        assert any("all_gather_into_tensor" in str(w.message) for w in caught), (
            "torch no longer warns: remove the filter in toolkit/compat.py"
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            silence_known_library_warnings()
            dist.all_gather_into_tensor(out, torch.ones(2))
            warnings.warn("another deprecation", FutureWarning)
        messages = [str(w.message) for w in caught]
        assert not any("all_gather_into_tensor" in m for m in messages)
        assert "another deprecation" in messages
    finally:
        dist.destroy_process_group()
