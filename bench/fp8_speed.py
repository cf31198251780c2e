"""FP8 against bf16: the whole training step's tokens/s and MFU at several depths, in one process.

    PYTHONPATH=. python3 bench/fp8_speed.py --data DIR [--depths 8,12,20,26] [--recipes tensorwise,rowwise]
        [--steps 8] [--out bench/results/fp8_speed-h200.jsonl]

For each depth the GPU preset's step (train.setup, the compiled model, the loop's own train_step,
through bench/train_speed.py's measure) runs in bf16 and then with each `--fp8` recipe. MFU counts
bf16-equivalent FLOPs against the bf16 peak for every variant (fp8.describe), so the columns compare.
Extra arguments go to every run (e.g. --total-batch-size 262144 keeps deep models' steps short:
tokens/s does not depend on how many micro-batches a step accumulates). Give --data: the default
corpus for a GPU (pysrc) is prepared on first use, which takes minutes.
"""
import train_speed  # bench/ is the script's own directory, first on sys.path


def main():
    p = train_speed.compare_parser(__doc__.splitlines()[0], "8,12,20,26", 8, 3)
    p.add_argument("--recipes", default="tensorwise,rowwise", help="comma-separated --fp8 recipes")
    args, extra = p.parse_known_args()
    variants = {"bf16": [], **{r: ["--fp8", r] for r in args.recipes.split(",")}}
    train_speed.compare(variants, args, extra)


if __name__ == "__main__":
    main()
