"""The training state and step, and the evaluation loss: pure functions of the state and a batch, jitted."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from midgpt import memory, precision, sharding
from midgpt.config import Config
from midgpt.model import GPT, cast_floats, fresh_model
from midgpt.optimizer import lr_schedule
from midgpt.precision import cross_entropy


class TrainState(eqx.Module):
    """Everything the next step depends on; the step also fixes the next batch."""

    model: GPT  # parameters in param_dtype
    opt_state: optax.OptState
    # Updates done so far: the next one trains on the batch of loop step `step + 1` (data.get_batch's seed
    # (seed, data.TRAIN_STREAM, step + 1)), with dropout masks from dropout_key folded with `step`.
    step: jax.Array
    dropout_key: jax.Array  # raw key data (uint32), so checkpoints hold plain arrays


def loss_fn(model: GPT, x_BxT, y_BxT, key=None, gather=None, chunks: int = 1):
    """Mean next-token cross-entropy, in float32; the logits made `chunks` slices of T at a time."""
    x_BxTxD, embed_VxD, _ = model.hidden(x_BxT, key=key, gather=gather)
    return cross_entropy(x_BxTxD, embed_VxD, y_BxT, chunks)


def fresh_state(config: Config, optimizer: optax.GradientTransformation) -> TrainState:
    """A newly initialised state, before any placement on devices."""
    model = fresh_model(config)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    dropout_key = jax.random.key_data(jax.random.key(config.seed + 1))
    return TrainState(model, opt_state, jnp.zeros((), jnp.int32), dropout_key)


def state_layout(config: Config, optimizer: optax.GradientTransformation, mesh: Mesh):
    """(shardings of the state's arrays, the state's non-array part), without computing it."""
    like = eqx.filter_eval_shape(fresh_state, config, optimizer)
    arrays_like, static = eqx.partition(like, sharding.is_abstract)
    return sharding.state_shardings(arrays_like, mesh, config), static


def init_state(config: Config, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """A fresh state, created in place on the mesh: no device ever holds all of it."""
    shardings, static = state_layout(config, optimizer, mesh)
    init = jax.jit(lambda: eqx.filter(fresh_state(config, optimizer), eqx.is_array), out_shardings=shardings)
    return eqx.combine(init(), static)


def fewest_parts(n: int, fits) -> int:
    """The fewest equal parts of n for which fits(parts) holds; n if none does."""
    return next(k for k in range(1, n + 1) if n % k == 0 and (fits(k) or k == n))


# On a CPU, arrays that outgrow the L3 cache slow every op that reads them (a matmul to
# about 40% of its speed), and small ones leave the cores idle between ops; so training
# and evaluation work on about this many activations (tokens x n_embd) at a time. Best
# here for width 384 (shakespeare_char: 1024 tokens; 3.8 s -> 3.0 s a step, 17.7 s -> 12.9 s
# to evaluate 20 batches) and near-best for width 128 (2048-3840 tokens measured best).
ACTIVATIONS_AT_ONCE = 1024 * 384


def pieces_per_micro_batch(config: Config, mesh: Mesh) -> int:
    """Into how many equal pieces the step and evaluation cut each micro-batch: several only on a lone CPU device."""
    B, T, D = config.batch_size, config.model.block_size, config.model.n_embd
    if mesh.size > 1 or not sharding.on_cpu(mesh):
        return 1
    return fewest_parts(B, lambda k: B // k * T * D <= ACTIVATIONS_AT_ONCE)


# Float32 logits (tokens x vocab) outgrow everything else at a large vocabulary, so the loss
# makes at most this many at a time on a device (4 GiB): openwebtext's 128 x 1024-token
# micro-batch in 8 slices on one GPU, whole from 8 GPUs on. Not fewer: on several devices
# each slice sums the output layer's gradient over them.
LOGITS_AT_ONCE = 2**30


def loss_chunks(config: Config, mesh: Mesh, pieces: int) -> int:
    """Into how many slices of the sequence the loss cuts each piece's logits (precision.cross_entropy)."""
    rows = max(1, config.batch_size // pieces // mesh.size)  # per device
    T, V = config.model.block_size, config.model.vocab_size
    return fewest_parts(T, lambda c: rows * T // c * V <= LOGITS_AT_ONCE)


def in_pieces(x_GxBxT, pieces: int):
    """The G micro-batches (or an evaluation's E batches) of B rows as M = G * pieces of b = B / pieces rows."""
    G, B, T = x_GxBxT.shape
    return x_GxBxT.reshape(G * pieces, B // pieces, T)


def compute_copy(params, dtype, shardings=None):
    """The parameters in the compute dtype, cast where each device holds them (`shardings`, where they are sharded)."""
    # Left to itself, XLA gathered the float32 embedding and cast it after, moving twice the bytes.
    copy = cast_floats(params, dtype)
    return copy if shardings is None else jax.lax.with_sharding_constraint(copy, shardings)


def make_train_step(config: Config, optimizer: optax.GradientTransformation, mesh: Mesh,
                    pieces: int | None = None, chunks: int | None = None, compiler_options: dict | None = None):
    """Build the jitted step (state, x_GxBxT, y_GxBxT) -> (state, metrics), compiled with XLA's compiler_options.

    Batches stacked for K steps (x_KxGxBxT) run the K in one call, with the last one's metrics. Each
    micro-batch runs as `pieces` smaller ones, whose logits the loss makes in `chunks` slices of T.
    """
    compute_dtype = jnp.dtype(precision.compute_dtype(config.compute_dtype))
    schedule = lr_schedule(config)
    state_shardings, static = state_layout(config, optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh, ndim=3, batch_axis=1)
    pieces = pieces or pieces_per_micro_batch(config, mesh)
    chunks = chunks or loss_chunks(config, mesh, pieces)
    gather = sharding.gather_params(mesh)

    def step(state_arrays, x_GxBxT, y_GxBxT):
        state = eqx.combine(state_arrays, static)
        params, model_static = eqx.partition(state.model, eqx.is_array)

        # Differentiate with respect to the param_dtype copy, so gradients and their sum over micro-batches are
        # in param_dtype; each micro-batch's weight gradient comes through the compute copy's cast, so in bf16
        # compute it is rounded to bf16 before the float32 sum (within the bf16 forward pass's own error).
        def micro_loss(params, x_BxT, y_BxT, micro_key):
            model = eqx.combine(compute_copy(params, compute_dtype, state_shardings.model), model_static)
            return loss_fn(model, x_BxT, y_BxT, micro_key, gather, chunks)

        def accumulate(grad_sum, micro_batch):
            loss, grad = jax.value_and_grad(micro_loss)(params, *micro_batch)
            return optax.tree.add(grad_sum, grad), loss

        # Equal micro-batches: the mean of their losses is the batch's.
        x_MxbxT, y_MxbxT = (in_pieces(a, pieces) for a in (x_GxBxT, y_GxBxT))
        M = len(x_MxbxT)
        # Dropout masks follow from the run's key, the step and M, so a run resumed on the same kind of machine
        # draws the same ones (a lone CPU cuts micro-batches into pieces, and so changes M).
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
        keys_M = jax.random.split(step_key, M)
        grad_sum, loss_M = jax.lax.scan(
            accumulate, optax.tree.zeros_like(params), (x_MxbxT, y_MxbxT, keys_M)
        )
        grads = optax.tree.scale(1 / M, grad_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss_M.mean(),
            "lr": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        new_state = TrainState(eqx.combine(params, model_static), opt_state, state.step + 1, state.dropout_key)
        return eqx.filter(new_state, eqx.is_array), metrics

    def steps(state_arrays, x_KxGxBxT, y_KxGxBxT):
        # Dispatching a step cost a small model's loop on a CPU more than the step's own work can hide.
        state_arrays, metrics_K = jax.lax.scan(lambda s, xy: step(s, *xy), state_arrays, (x_KxGxBxT, y_KxGxBxT))
        return state_arrays, jax.tree.map(lambda m_K: m_K[-1], metrics_K)

    def jit(f, batches):
        # Declared shardings keep the state in its FSDP layout between steps: nothing is gathered by accident.
        return jax.jit(f, in_shardings=(state_shardings, batches, batches),
                       out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0,
                       compiler_options=compiler_options)

    one, many = jit(step, batch_sharding), jit(steps, sharding.batch_sharding(mesh, ndim=4, batch_axis=2))
    program_for = lambda x: one if x.ndim == 3 else many  # one step's batches, or several steps' stacked

    def train_step(state: TrainState, x, y):
        state_arrays, metrics = program_for(x)(eqx.filter(state, eqx.is_array), x, y)
        return eqx.combine(state_arrays, static), metrics

    # For inspecting the compiled step (memory, collectives), as with any jitted function.
    train_step.lower = lambda state, x, y: program_for(x).lower(eqx.filter(state, eqx.is_array), x, y)
    return train_step


@eqx.filter_jit
def eval_loss(model: GPT, x_ExBxT, y_ExBxT, compute_dtype: str, pieces: int = 1, gather=None, chunks: int = 1,
              shardings=None):
    """Mean loss over E batches, each cut into `pieces` (its logits into `chunks`), in one call: one dispatch.

    shardings: of the model's arrays (eqx.filter(model, eqx.is_array)), where it is sharded.
    """
    params, static = eqx.partition(model, eqx.is_array)
    dtype = jnp.dtype(precision.compute_dtype(compute_dtype))
    model = eqx.combine(compute_copy(params, dtype, shardings), static)
    x_MxbxT, y_MxbxT = (in_pieces(a, pieces) for a in (x_ExBxT, y_ExBxT))
    M, b, T = x_MxbxT.shape
    at_once = min(ACTIVATIONS_AT_ONCE // (b * T * model.config.n_embd), M)  # pieces in the budget
    # Pieces under the budget run several at a time: alone, their matmuls are too small to keep a CPU busy
    # (shakespeare_char_cpu's evaluation: 0.21 s -> 0.17 s). One that fills it runs alone (None): lax.map's
    # batch_size=1 adds a vmap of one, which XLA:CPU ran 10% slower there, but a quarter faster on a piece
    # over the budget (shakespeare_char's whole 64-row batches).
    map_size = at_once if at_once > 1 else None if at_once == 1 else 1  # pieces a lax.map iteration
    # Whole groups, the last filled up with pieces that the mean leaves out: lax.map would trace the
    # model a second time for a remainder (0.6 s of shakespeare_char_cpu's 1.8 s evaluation compile).
    pad = -M % map_size if map_size else 0
    x_QxbxT, y_QxbxT = (jnp.concatenate([a, a[:pad]]) for a in (x_MxbxT, y_MxbxT))  # Q = M + pad pieces
    loss_Q = jax.lax.map(lambda batch: loss_fn(model, *batch, gather=gather, chunks=chunks), (x_QxbxT, y_QxbxT),
                         batch_size=map_size)
    return loss_Q[:M].mean()


def memory_estimator(mesh: Mesh, like: TrainState, shardings):
    """config -> memory.estimate of the step as make_train_step runs it, with this mesh and state."""
    def estimate_for(c: Config) -> dict[str, int]:
        pieces = pieces_per_micro_batch(c, mesh)
        return memory.estimate(c, mesh, like, shardings, pieces, loss_chunks(c, mesh, pieces))
    return estimate_for
