#!/usr/bin/env bash
# Mutation pass (mutmut 3) over one module of dsmoe/ against the tests that exercise it.
#
#   tools/mutation_python.sh losses                 # the module's default test selection (below)
#   tools/mutation_python.sh layers tests/test_model.py -k moe   # or your own pytest arguments
#   RESUME=1 tools/mutation_python.sh layers        # continue a stopped pass: keeps the results,
#                                                   # refreshes the copies of dsmoe/ and tests/
#   MUTANTS='dsmoe.layers.xǁTopKRouterǁ*' tools/mutation_python.sh layers   # only these (fnmatch)
#
# Runs in a scratch copy, build/mutation/<module>/ (dsmoe/ with its compiled _C*.so, tests/,
# a generated setup.cfg with the [mutmut] section), so nothing of mutmut's (mutants/, its
# config) touches the checkout or a normal build. Under nice 19: it is a long batch job.
# Prints mutmut's counts and the surviving mutants, and writes build/mutation/<module>/survivors.txt
# (each survivor's diff). Needs `pip install mutmut==3.8.1` (tools/install.sh installs it).
# See docs/mutation_testing.md for the last counts and the survivors judged equivalent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
mod=${1:?usage: tools/mutation_python.sh MODULE [pytest args...]  (MODULE: losses, layers, hf/modeling, ...)}
shift
src=dsmoe/$mod.py   # a module of a subpackage by its path: hf/modeling
[ -f "$src" ] || { echo "no such module: $src" >&2; exit 2; }
"$PY" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: pip install mutmut==3.8.1" >&2; exit 2; }

deselect=()
if [ $# -gt 0 ]; then
  tests=("$@")
else
  # the tests that exercise each module; small enough that one mutant takes seconds
  case $mod in
    losses) tests=(tests/test_losses_formulas.py tests/test_model.py tests/test_ops_reference.py) ;;
    layers) tests=(tests/test_mutation_kills.py tests/test_model.py tests/test_losses_formulas.py) ;;
    config) tests=(tests/test_model_config.py tests/test_mutation_kills.py tests/test_losses_formulas.py) ;;
    model) tests=(tests/test_model.py tests/test_mutation_kills.py tests/test_generation.py tests/test_checkpoint.py) ;;
    # opcheck of the decode ops reaches every settings read and takes ~15 s: run once, not per mutant
    backend) tests=(tests/test_backend.py tests/test_model.py tests/test_mutation_kills.py tests/test_moe_decode.py)
             deselect=(tests/test_moe_decode.py::test_opcheck) ;;
    decode) tests=(tests/test_moe_decode.py) ;;
    generation) tests=(tests/test_generation.py tests/test_model.py tests/test_mutation_kills.py) ;;
    # opcheck, the fake-vs-CPU parity and compile run the fake kernels (meta shapes, the checks)
    # (fullgraph compiles cannot trace mutmut's trampolines: those two run outside it)
    ops) tests=(tests/test_ops_gate.py tests/test_ops_permute.py tests/test_ops_gemm.py tests/test_ops_reference.py
                tests/test_ops_opcheck.py tests/test_ops_fake_parity.py tests/test_ops_compile.py tests/test_moe_decode.py
                tests/test_mutation_kills.py)
         deselect=("tests/test_ops_compile.py::test_compile_fullgraph_matches_eager" tests/test_moe_decode.py::test_torch_compile) ;;
    # (the import checks run in subprocesses, ~8 s each; the compiled training step cannot trace
    # mutmut's trampolines)
    hf/modeling) tests=(tests/test_hf_model.py)
                 deselect=(tests/test_hf_model.py::test_import_dsmoe_without_transformers_and_lazily_with_it) ;;
    hf/experts) tests=(tests/test_hf_experts.py)
                deselect=(tests/test_hf_experts.py::test_compile_fullgraph_training_step
                          tests/test_hf_experts.py::test_import_dsmoe_without_transformers) ;;
    analysis) tests=(tests/test_analysis.py) ;;
    checkpoint) tests=(tests/test_checkpoint.py) ;;
    fileio) tests=(tests/test_fileio.py) ;;
    tokenizer) tests=(tests/test_tokenizer.py) ;;
    # (the parameter-count test reads the README, which the scratch copy lacks)
    cli/common) tests=(tests/test_cli_common.py tests/test_cli_runs.py tests/test_cli.py)
                deselect=(tests/test_cli_runs.py::test_one_parameter_count_for_the_default_model) ;;
    # the in-process unit tests, then whole runs (test_cli_runs: lineage, locks, --overwrite)
    cli/checkpoint) tests=(tests/test_cli_checkpoint.py tests/test_cli_data.py tests/test_cli_runs.py)
                    deselect=(tests/test_cli_runs.py::test_one_parameter_count_for_the_default_model) ;;
    cli/train) tests=(tests/test_cli_train.py tests/test_cli_data.py tests/test_cli_runs.py)
               deselect=(tests/test_cli_runs.py::test_one_parameter_count_for_the_default_model) ;;
    cli/data) tests=(tests/test_cli_data.py) ;;
    cli/models) tests=(tests/test_cli_models.py tests/test_cli_data.py) ;;
    cli/generate) tests=(tests/test_cli_generate.py) ;;
    cli/__init__) tests=(tests/test_cli_generate.py tests/test_cli.py) ;;
    cli/experts) tests=(tests/test_cli_experts.py) ;;
    cli/compare) tests=(tests/test_cli_compare_units.py) ;;
    cli/bench|cli/info) tests=(tests/test_cli_bench_info.py) ;;
    cli/distributed/launch) tests=(tests/test_distributed_cli_single.py) ;;
    cli/distributed/options) tests=(tests/test_distributed_cli_single.py tests/test_cli_train.py) ;;
    # one-rank process groups in-process; what needs several ranks (tests/test_distributed.py starts
    # them as processes, which mutmut's per-test selection cannot see) is for tools/mutation_rerun.sh
    distributed/mesh|distributed/comm|cli/distributed/training) tests=(tests/test_distributed_single.py) ;;
    distributed/checkpoint|distributed/expert_parallel|distributed/fsdp)
      tests=(tests/test_distributed_checkpoint_single.py tests/test_distributed_single.py) ;;
    # the package's glue: lazy names, the extension loader, the transformers hook, the alias
    # (what runs at import time is out of mutmut's sight: rerun its survivors, tools/mutation_rerun.sh)
    __init__|_ext|_hf_registration|distributed/__init__) tests=(tests/test_package.py) ;;
    # the plain-PyTorch oracle: the ops tests compare the kernels with it, test_ops_reference it with the seeds
    reference) tests=(tests/test_ops_reference.py tests/test_ops_gate.py tests/test_ops_gemm.py tests/test_ops_permute.py tests/test_model.py tests/test_losses_formulas.py) ;;
    *) echo "no default tests for $mod: pass pytest arguments" >&2; exit 2 ;;
  esac
  # where generate's warning points cannot be checked under mutmut: its trampolines add frames
  # of its own package between the caller and generate
  if [[ " ${tests[*]} " == *" tests/test_generation.py "* ]]; then
    deselect+=(tests/test_generation.py::test_right_padding_warning_points_at_the_callers_line)
  fi
fi

work=build/mutation/${mod//\//_}
if [ "${RESUME:-0}" = 1 ] && [ -d "$work/mutants" ]; then
  # mutmut keeps each mutant's result in mutants/dsmoe/<module>.py.meta and regenerates the
  # mutants of a changed function; the other modules, the extension and the tests are copied anew
  rm -rf "$work/dsmoe" "$work/tests" "$work/mutants/tests"
  cp -a dsmoe tests pyproject.toml "$work"/
  cp -a tests "$work/mutants/tests"
  (cd dsmoe && find . -type f ! -path "./$mod.py" ! -name '*.pyc' -exec cp --parents {} "$ROOT/$work/mutants/dsmoe/" \;)
else
  rm -rf "$work"
  mkdir -p "$work"
  cp -a dsmoe tests pyproject.toml "$work"/
fi
# mutmut 3 leaves decorated functions alone. The decorators that only register or wrap the
# function (@torch.no_grad(): generate, init_weights, ...; @torch.library.register_fake: the ops'
# fake kernels; @contextlib.contextmanager) are applied after the definitions instead, so their
# bodies get mutants too. A stacked decorator is left as it is: moving one would reorder them.
"$PY" - "$work/dsmoe/$mod.py" <<'PYEOF'
import re, sys
path = sys.argv[1]
lines = open(path, encoding="utf-8").read().split("\n")
applied_later = re.compile(r"(\s*)@(torch\.no_grad\(\)|torch\.library\.register_fake\(.*\)|contextlib\.contextmanager)\s*")
out, wraps, cls = [], [], None
for i, line in enumerate(lines):
    match = re.match(r"class (\w+)", line)
    if match:
        cls = match.group(1)
    nxt = lines[i + 1] if i + 1 < len(lines) else ""
    prev = lines[i - 1] if i else ""
    deco = applied_later.fullmatch(line)
    func = re.match(r"(\s*)def (\w+)\(", nxt)
    stacked = prev.strip().startswith("@")
    if deco and func and not stacked and func.group(1) == deco.group(1) and len(deco.group(1)) in (0, 4):
        name = func.group(2) if not deco.group(1) else f"{cls}.{func.group(2)}"
        wraps.append(f"{name} = {deco.group(2)}({name})")
        continue
    out.append(line)
if wraps:
    out += ["", "# tools/mutation_python.sh: the decorators, applied here"] + wraps + [""]
open(path, "w", encoding="utf-8").write("\n".join(out))
PYEOF
# pyproject.toml carries no [tool.mutmut], so mutmut reads setup.cfg
{
  echo "[mutmut]"
  echo "source_paths = dsmoe"
  echo "only_mutate = $src"
  echo "process_isolation = forkserver"
  # mutmut's CPU-time limit per mutant is (the tests' duration + constant) x multiplier x 2: here at
  # least 5 min, room for a slow machine (torch is imported once, in mutmut's forkserver), while a
  # mutant that loops forever costs minutes, not the half hour a multiplier of 30 gave
  echo "timeout_multiplier = 5"
  echo "timeout_constant = 30"
  # the emulator tests need tools/ (not in the copy) and test the .cu sources, not dsmoe/
  printf 'pytest_add_cli_args =\n    -m\n    not simt\n'
  for d in "${deselect[@]}"; do printf '    --deselect\n    %s\n' "$d"; done
  echo "pytest_add_cli_args_test_selection ="
  for t in "${tests[@]}"; do echo "    $t"; done
} > "$work/setup.cfg"

cd "$work"
# only the mutated copy: never the checkout (or an installed dsmoe)
# (made now: a PYTHONPATH entry that does not exist when Python starts is never looked at again)
mkdir -p mutants
export PYTHONPATH="$ROOT/$work/mutants"
export OMP_NUM_THREADS=1
read -r -a only <<< "${MUTANTS:-}"
nice -n 19 "$PY" -m mutmut run --max-children "${MUTMUT_JOBS:-2}" "${only[@]}" 2>&1 | tail -n 30 || true
"$PY" -m mutmut results --all true > results.txt 2>&1 || true
grep -E ": (survived|no tests|timeout|suspicious|skipped)" results.txt | sed 's/^ *//' > survivors_names.txt || true
: > survivors.txt
while read -r line; do
  name=${line%%:*}
  "$PY" -m mutmut show "$name" >> survivors.txt 2>&1 || true
  echo >> survivors.txt
done < survivors_names.txt
echo "== $mod: $(grep -c ': killed' results.txt || true) killed, $(grep -c ': survived' results.txt || true) survived," \
  "$(grep -c ': no tests' results.txt || true) without tests, $(grep -c ': timeout' results.txt || true) timed out"
echo "survivors (diffs in $work/survivors.txt):"
cat survivors_names.txt
