"""benchmarks.tpu_fit's bookkeeping: commands, the measured MFU it projects with, and the generated tables."""

import json

from benchmarks import tpu_fit

GiB = 1024 ** 3


def _record(preset, arch, gen, chips, fits, num_slices=1, grad_accum=1, loss_chunk=0):
  rec = {"preset": preset, "arch": arch, "generation": gen, "chips": chips, "slice_chips": chips,
         "num_slices": num_slices, "fits": fits, "memory": {"hbm": 32 * GiB}, "loss_chunk": loss_chunk}
  if fits:
    rec.update(topology=f"{gen}:2x{chips // 2}", accelerator_type=f"{gen}-{chips}", grad_accum=grad_accum,
               mesh={"data": num_slices, "fsdp": chips // num_slices, "tensor": 1}, remat="full",
               compile_s=12.0, flops={"compiled_per_step": 2.5e15, "ours_per_step": 2e15, "compiled_over_ours": 1.25})
    rec["memory"].update(total=20 * GiB)
  return rec


def test_command_states_the_remat_policy_and_extras():
  cmd = tpu_fit.display(tpu_fit.command("1p3b", "transformer", "v6e:4x4", num_slices=2, grad_accum=8,
                                        loss_chunk=256))
  assert cmd == ("python -m experiments.compile_tpu --config=experiments/configs/1p3b.py:transformer "
                 "--topology=v6e:4x4 --fsdp --json --config.model.remat=full --num_slices=2 "
                 "--config.train.grad_accum=8 --config.model.loss_chunk=256")


def test_measured_mfu_takes_the_largest_matmul_free_model(tmp_path):
  path = tmp_path / "train_step.jsonl"
  rows = [
      {"arch": "hgrn_bit", "params": 3.7e8, "mfu_exact": 0.25, "batch": 16, "seq_len": 2048, "remat": "full",
       "tokens_per_s": 1e5, "device": "GPU"},
      {"arch": "hgrn_bit", "params": 1.4e9, "mfu_exact": 0.31, "batch": 8, "seq_len": 2048, "remat": "save_proj",
       "tokens_per_s": 4e4, "device": "GPU"},
      {"arch": "hgrn_bit", "params": 1.4e9, "mfu_exact": 0.27, "batch": 8, "seq_len": 2048, "remat": "full",
       "tokens_per_s": 3.4e4, "device": "GPU"},
      {"arch": "transformer", "params": 1.4e9, "mfu_exact": 0.41, "batch": 8, "seq_len": 2048, "remat": "full",
       "tokens_per_s": 4.8e4, "device": "GPU"},
  ]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  mfu, where = tpu_fit.measured_mfu(path)
  assert mfu == 0.31
  assert "save_proj" in where and "40.0k" in where


def test_render_reports_the_smallest_fit_and_the_search_state():
  records = [_record("370m", "mmfree", "v6e", 4, False), _record("370m", "mmfree", "v6e", 8, True),
             _record("370m", "mmfree", "v6e", 16, True), _record("370m", "mmfree", "v5e", 8, False),
             _record("13b", "mmfree", "v6e", 16, True, grad_accum=64),
             _record("370m", "mmfree", "v6e", 2, False, loss_chunk=256),
             _record("370m", "mmfree", "v6e", 4, True, loss_chunk=256),
             dict(_record("370m", "transformer", "v6e", 8, None, loss_chunk=256), crashed=True, memory={}),
             _record("370m", "transformer", "v6e", 16, True, loss_chunk=256)]
  table = tpu_fit.render(records, mfu=0.5)
  line = next(l for l in table.splitlines() if l.startswith("| 370m | mmfree | v6e |"))
  assert "v6e:2x4 (v6e-8, 8 chips)" in line and "20.0 / 32" in line and "1.25" in line
  assert line.endswith("| 4 chips, 20.0 / 32 |"), line
  line = next(l for l in table.splitlines() if l.startswith("| 370m | transformer | v6e |"))
  assert line.endswith("| 16 chips, 20.0 / 32 (compiler crash at 8 chips) |"), line
  assert "| 370m | mmfree | v5e | no fit up to 8 chips |" in table
  assert "| 370m | transformer | v5p | not measured |" in table
  # 1e23 FLOPs on 16 v6e chips at 50% MFU: 1e23 / (16 * 918e12 * 0.5) s.
  days = 1e23 / (16 * 918e12 * 0.5) / 86400
  large = next(l for l in table.splitlines() if l.startswith("| 13b | v6e | 1 x"))
  assert f"| {days:,.0f} |" in large
  assert "at 50.0% MFU" in table


def test_write_block_replaces_only_the_generated_part(tmp_path):
  doc = tmp_path / "doc.md"
  doc.write_text(f"intro\n{tpu_fit.BEGIN}\nold\n{tpu_fit.END}\noutro\n")
  tpu_fit.write_block(doc, "new table")
  assert doc.read_text() == f"intro\n{tpu_fit.BEGIN}\nnew table\n{tpu_fit.END}\noutro\n"
