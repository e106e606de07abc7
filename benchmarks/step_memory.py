"""Memory of the real training step, as XLA compiles it, against the estimate that launch.py prints.

python benchmarks/step_memory.py --config=openwebtext [--chunks=1,8] [--pieces=1] [--FIELD=VALUE ...]
compiles the step without running it and prints one JSON line per loss slicing (--chunks; by
default the one training uses): XLA's temporary, argument and output bytes on the first
device, and memory.estimate's parts. Runs unchanged on a CPU, a GPU or a TPU.
"""

import json

from midgpt.cli import ArgumentParser, add_config_option, positive_int, run, say
from train_throughput import call_shape, check_device, checked_config, run_fields


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated whole numbers above 0."""
    return [positive_int(n) for n in text.split(",")]


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__)
    add_config_option(parser, required=True)
    parser.add_argument("--chunks", type=positive_ints,
                        help="comma-separated slice counts for the loss (default: training's)")
    parser.add_argument("--pieces", type=positive_int, help="pieces per micro-batch (default: training's)")
    args, overrides = parser.parse_known_args(argv)
    config = checked_config(args.config, overrides, list(vars(args)))
    B, T = config.batch_size, config.model.block_size
    # The step cuts the batch's rows into pieces, and each piece's sequence into chunks, of equal sizes.
    if args.pieces and B % args.pieces:
        parser.error(f"--pieces={args.pieces} does not divide batch_size={B}; use a divisor of it")
    for chunks in args.chunks or []:
        if T % chunks:
            parser.error(f"--chunks={chunks} does not divide model.block_size={T}; use divisors of it")

    import equinox as eqx
    import jax  # only once the arguments are good
    import jax.numpy as jnp

    from midgpt import memory
    from midgpt.optimizer import make_optimizer
    from midgpt.sharding import make_mesh
    from midgpt.step import fresh_state, init_state, loss_chunks, make_train_step, pieces_per_micro_batch, state_layout

    check_device(config)
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    pieces = args.pieces or pieces_per_micro_batch(config, mesh)
    state = init_state(config, optimizer, mesh)
    shardings, _ = state_layout(config, optimizer, mesh)
    like = eqx.filter_eval_shape(fresh_state, config, optimizer)
    batch = jax.ShapeDtypeStruct(call_shape(config), jnp.int32)  # launch.py's program: several steps a call, if so
    for chunks in args.chunks or [loss_chunks(config, mesh, pieces)]:
        compiled = make_train_step(config, optimizer, mesh, pieces, chunks).lower(state, batch, batch).compile()
        xla = compiled.memory_analysis()
        if not say(json.dumps({
            **run_fields(args.config, overrides), "pieces": pieces, "chunks": chunks,
            "xla_temp_bytes": xla.temp_size_in_bytes, "xla_argument_bytes": xla.argument_size_in_bytes,
            "xla_output_bytes": xla.output_size_in_bytes,
            "estimate_bytes": memory.estimate(config, mesh, like, shardings, pieces, chunks),
        })):
            break  # stdout's reader is gone: none reads the next chunk count's


if __name__ == "__main__":
    run(main)
