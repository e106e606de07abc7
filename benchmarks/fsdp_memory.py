"""Bytes of parameters + optimiser state per device under FSDP, against one device.

python benchmarks/fsdp_memory.py --config=shakespeare_char --devices=8 [--FIELD=VALUE ...]
prints one JSON line. --devices fakes that many CPU devices. --abstract computes the
layout without allocating (for models too large for this machine).
"""

import json
import os

from midgpt.cli import ArgumentParser, add_config_option, positive_int, run, say
from train_throughput import check_device, checked_config


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__)
    add_config_option(parser, required=True)
    parser.add_argument("--devices", type=positive_int, default=8, help="CPU devices to fake")
    parser.add_argument("--abstract", action="store_true", help="compute the layout without allocating it")
    args, overrides = parser.parse_known_args(argv)
    config = checked_config(args.config, overrides, list(vars(args)))
    # Before JAX starts; on CPU devices, which alone can be faked, also on a GPU host.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"

    import equinox as eqx
    import jax

    from midgpt.memory import sharded_bytes, tree_bytes
    from midgpt.optimizer import make_optimizer
    from midgpt.sharding import is_abstract, make_mesh
    from midgpt.step import fresh_state, init_state, state_layout

    check_device(config)
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    shardings, _ = state_layout(config, optimizer, mesh)
    like = eqx.filter_eval_shape(fresh_state, config, optimizer)
    total = tree_bytes(eqx.filter(like, is_abstract))
    if args.abstract:  # every device holds the same share
        per_device = [sharded_bytes(like, shardings)]
    else:
        state = init_state(config, optimizer, mesh)
        bytes_on = {d: 0 for d in jax.devices()}
        for x in jax.tree.leaves(eqx.filter(state, eqx.is_array)):
            for shard in x.addressable_shards:
                bytes_on[shard.device] += shard.data.nbytes
        per_device = list(bytes_on.values())
    say(json.dumps({
        "config": args.config, "overrides": overrides, "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "parameters": sum(x.size for x in jax.tree.leaves(eqx.filter(like.model, is_abstract))),
        "state_bytes_one_device": total, "state_bytes_per_device_max": max(per_device),
        "per_device_fraction": max(per_device) / total, "measured_on_arrays": not args.abstract,
    }))


if __name__ == "__main__":
    run(main)
