"""OpenVINO as a latency baseline: a random checkpoint's backbone as a stateful OpenVINO model.

What a CPU user picks instead of us is OpenVINO with a stateful Qwen3 export (optimum-intel's
layout: the KV cache lives in the request's state, each call feeds only new tokens). optimum-intel
pulls a CUDA build of torch, so it is not used here: `ExportBackbone` is the Qwen3 backbone written
for export (explicit past K/V in, last hidden states and present K/V out, transformers' repeat_kv
and SDPA, so OpenVINO's CPU plugin fuses the stateful attention as it does for optimum's export),
`ov.convert_model` traces it, and `apply_make_stateful_transformation` turns each past/present pair
into a ReadValue/Assign state. The lm_head is not part of it: the guard heads of the StreamGuard
being measured run on the returned hidden states in torch, as in the other baselines.

`OpenVino` is the latency benchmark's runner (reset / step / rollback). Two precisions are timed:
"fp32" (inference and KV-cache precision forced to f32) and "default" (the plugin's own choice on
this CPU: bf16 compute where the CPU has it, a reduced-precision KV cache). The `openvino`
package is optional and never a dependency of the project (pip install openvino); nothing here is
used by the runtime.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from qguard_stream.config import GuardConfig
from qguard_stream.models.guard import GuardHead
from qguard_stream.runtime.cpu_step import torch_threads

PRECISIONS = ("fp32", "default")
BEAM = np.zeros(1, dtype=np.int32)  # one sequence: the state's row 0


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """transformers' repeat_kv (expand + reshape): the form OpenVINO's SDPA fusion matches."""
    if groups == 1:
        return x
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, length, dim).reshape(
        batch, heads * groups, length, dim)


class ExportBackbone(torch.nn.Module):
    """Qwen3's backbone for export: (input_ids [1, k], position_ids [1, k], past K/V per layer
    [1, KV, past, D]) -> (last hidden states [1, k, hidden], present K/V per layer)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: GuardConfig) -> None:
        super().__init__()
        self.config = config
        self.weights = {name.removeprefix("model."): tensor.float().contiguous()
                        for name, tensor in tensors.items() if name.startswith("model.")}
        dim = config.head_dim
        self.inv_freq = 1.0 / (config.rope_theta ** (
            torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c, w = self.config, self.weights
        eps, heads, kv_heads, dim = (c.rms_norm_eps, c.num_attention_heads,
                                     c.num_key_value_heads, c.head_dim)
        k = input_ids.shape[1]
        hidden = torch.nn.functional.embedding(input_ids, w["embed_tokens.weight"])
        freqs = position_ids[..., None].float() * self.inv_freq  # [1, k, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [1, 1, k, D]
        cos, sin = angles.cos(), angles.sin()
        # Query row i (position past + i) sees keys 0 .. past + i; the past length comes from
        # the mask's (all ones, optimum's input) so that no shape is read off the states.
        total = attention_mask.shape[1]
        rows = torch.arange(k)[:, None] + (total - k)
        visible = torch.arange(total)[None, :] <= rows  # [k, total]
        # additive, [1, 1, k, total], as transformers' SDPA path builds it
        mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[None, None]
        presents: list[torch.Tensor] = []
        for layer in range(c.num_hidden_layers):
            p = f"layers.{layer}."
            x = _rms_norm(hidden, w[p + "input_layernorm.weight"], eps)
            q = (x @ w[p + "self_attn.q_proj.weight"].T).view(1, k, heads, dim)
            key = (x @ w[p + "self_attn.k_proj.weight"].T).view(1, k, kv_heads, dim)
            value = (x @ w[p + "self_attn.v_proj.weight"].T).view(1, k, kv_heads, dim)
            q = _rms_norm(q, w[p + "self_attn.q_norm.weight"], eps).transpose(1, 2)
            key = _rms_norm(key, w[p + "self_attn.k_norm.weight"], eps).transpose(1, 2)
            value = value.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            key = key * cos + _rotate_half(key) * sin
            key = torch.cat((past[2 * layer], key), dim=2)
            value = torch.cat((past[2 * layer + 1], value), dim=2)
            presents += [key, value]
            groups = heads // kv_heads
            attended = torch.nn.functional.scaled_dot_product_attention(
                q, _repeat_kv(key, groups), _repeat_kv(value, groups), attn_mask=mask)
            attended = attended.transpose(1, 2).reshape(1, k, heads * dim)
            hidden = hidden + attended @ w[p + "self_attn.o_proj.weight"].T
            x = _rms_norm(hidden, w[p + "post_attention_layernorm.weight"], eps)
            gate = x @ w[p + "mlp.gate_proj.weight"].T
            up = x @ w[p + "mlp.up_proj.weight"].T
            act = torch.nn.functional.silu(gate) * up
            hidden = hidden + act @ w[p + "mlp.down_proj.weight"].T
        return (_rms_norm(hidden, w["norm.weight"], eps), *presents)

    def empty_past(self, length: int = 0) -> list[torch.Tensor]:
        """Zero past K/V of `length` positions for every layer (an example input, or a start)."""
        c = self.config
        return [torch.zeros(1, c.num_key_value_heads, length, c.head_dim)
                for _ in range(2 * c.num_hidden_layers)]


def read_backbone_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's `model.*` tensors, read straight from its safetensors."""
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith("model."):
                    tensors[name] = handle.get_tensor(name)
    return tensors


def export_stateful(backbone: ExportBackbone):  # -> openvino.Model
    """Trace `backbone` into OpenVINO with dynamic token and past lengths, then make every
    past/present pair a state of the request (nothing of the KV cache crosses the API)."""
    import openvino as ov
    from openvino._offline_transformations import apply_make_stateful_transformation

    c = backbone.config
    layers = c.num_hidden_layers
    example = (torch.zeros(1, 3, dtype=torch.int64), torch.ones(1, 5, dtype=torch.int64),
               torch.arange(3)[None] + 2, *backbone.empty_past(2))
    past_shape = ov.PartialShape([1, c.num_key_value_heads, -1, c.head_dim])
    shapes = [ov.PartialShape([1, -1])] * 3 + [past_shape] * (2 * layers)
    with torch.no_grad():
        model = ov.convert_model(backbone, example_input=example, input=shapes)
    names = ["input_ids", "attention_mask", "position_ids"] + [f"past.{i // 2}.{'kv'[i % 2]}"
                                             for i in range(2 * layers)]
    for port, name in zip(model.inputs, names):
        port.get_tensor().set_names({name})
    outputs = ["hidden"] + [f"present.{i // 2}.{'kv'[i % 2]}" for i in range(2 * layers)]
    for port, name in zip(model.outputs, outputs):
        port.get_tensor().set_names({name})
    _reorder_past_by_beam(model)
    apply_make_stateful_transformation(
        model, {f"past.{i // 2}.{'kv'[i % 2]}": f"present.{i // 2}.{'kv'[i % 2]}"
                for i in range(2 * layers)})
    _initialize_states(model, c)
    return model


def _reorder_past_by_beam(model) -> None:
    """Read every past K/V input through a Gather by a `beam_idx` input (before the inputs become
    states), as optimum-intel's export does: the CPU plugin fuses ReadValue -> Gather -> Concat
    -> SDPA (+ Assign) into its stateful attention, which keeps the KV cache in its own layout
    and precision, only in that form."""
    import openvino as ov
    import openvino.opset13 as ops

    beam_idx = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    for node in model.get_parameters():
        if not node.get_output_tensor(0).get_any_name().startswith("past."):
            continue
        consumers = list(node.output(0).get_target_inputs())
        gathered = ops.gather(node, beam_idx, ops.constant(0, ov.Type.i64))
        for consumer in consumers:
            consumer.replace_source_output(gathered.output(0))
    model.add_parameters([beam_idx])
    model.validate_nodes_and_infer_types()


def _initialize_states(model, config: GuardConfig) -> None:
    """Give every state an initializer (an empty [1, KV, 0, D] cache), as optimum-intel's
    export does: the CPU plugin's fused stateful attention reads the state's initial value."""
    import openvino.opset13 as ops

    shape = ops.constant(np.array([1, config.num_key_value_heads, 0, config.head_dim],
                                  dtype=np.int64))
    for node in model.get_ops():
        if node.get_type_name() == "ReadValue":
            zero = ops.constant(0.0, node.get_output_element_type(0))
            node.set_arguments([ops.broadcast(zero, shape)])
    model.validate_nodes_and_infer_types()


def compile_model(model, precision: str, threads: int):  # -> openvino.CompiledModel
    """Compile for the CPU on `threads` threads, one stream, latency hint; "fp32" forces f32
    compute and an f32 KV cache, "default" leaves both to the plugin."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
              "PERFORMANCE_HINT": "LATENCY"}
    if precision == "fp32":
        config |= {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    return ov.Core().compile_model(model, "CPU", config)


class OpenVino:
    """The latency benchmark's OpenVINO runner: one stateful request; the guard head of the
    measured StreamGuard on its hidden states. Rollback trims the states (untimed)."""

    def __init__(self, compiled, head: GuardHead, precision: str) -> None:
        self.name = f"openvino_{precision}"
        self.compiled, self.head = compiled, head
        self.request = compiled.create_infer_request()
        self.length = 0
        props = {}
        for key in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION"):
            try:
                value = compiled.get_property(key)  # an ov.Type: "f32", "u8", "bf16"
                props[key] = value.to_string() if hasattr(value, "to_string") else str(value)
            except RuntimeError:
                props[key] = "?"
        self.properties = props

    def reset(self, prompt_ids: torch.Tensor) -> None:
        self.request.reset_state()
        self.length = 0
        self.step(prompt_ids)

    def hidden(self, new_ids: torch.Tensor) -> torch.Tensor:
        k = new_ids.shape[0]
        ids = new_ids.numpy().astype(np.int64)[None]
        positions = np.arange(self.length, self.length + k, dtype=np.int64)[None]
        mask = np.ones((1, self.length + k), dtype=np.int64)
        self.request.infer({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                            "beam_idx": BEAM}, share_inputs=True)
        self.length += k
        return torch.from_numpy(self.request.get_tensor("hidden").data[0])

    @torch.inference_mode()
    def step(self, new_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden(new_ids).to(self.head.pre.weight.dtype)  # a bf16 guard's heads
        # The head on one torch thread, as our step runs it: torch's OpenMP workers would spin
        # after it and take the cores from OpenVINO's threads (or ours) in the next call.
        with torch_threads(1):
            return self.head(hidden)

    def rollback(self, length: int) -> None:
        import openvino as ov

        if length == self.length:
            return
        for state in self.request.query_state():
            kept = np.ascontiguousarray(state.state.data[:, :, :length])
            state.state = ov.Tensor(kept)
        self.length = length


def openvino_runners(directory: Path, config: GuardConfig, head: GuardHead, threads: int,
                     precisions: tuple[str, ...] = PRECISIONS) -> list[OpenVino]:
    """One runner per precision over one export of the checkpoint's backbone."""
    model = export_stateful(ExportBackbone(read_backbone_tensors(directory), config))
    return [OpenVino(compile_model(model, precision, threads), head, precision)
            for precision in precisions]
