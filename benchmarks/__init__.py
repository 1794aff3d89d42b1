"""Benchmarks and figure scripts: run each from the project root as `python -m benchmarks.<name> --help`.

Speed, ours beside the official FlexVAR code in one process (FLEXVAR_OFFICIAL_DIR names its folder;
without it, ours alone), printed as JSON; `benchmarks_md` turns one run's JSON into the tables of
docs/benchmarks.md:
    bench_transformer   transformer train step and full step (eager, compiled)
    bench_sample        sampling with and without decode
    bench_tokenizer     tokenizer train step and inference
    profile_steps       where a step's time goes, by operator class, against the matmul floor
    bench_malloc        page faults and time per step, glibc's malloc defaults vs freed memory retained
    side_by_side        (shared) the official code's import, interleaved timing, the machine's state
    benchmarks_md       markdown tables from a folder of the scripts' JSON

GPU, scale and memory:
    gpu_library_check   the library's training, resume, generation and edit paths on CUDA
    gpu_d16             the d16 paper preset's train step (MFU) and sampling on one GPU
    scale_memory        peak memory per stage at two dataset sizes (is it independent of N?)
    scaling_projection  DDP / FSDP scaling and host memory of the d16 preset, projected from the above

Figures in docs/:
    gt_vs_residual          ground-truth vs residual prediction training curves (paper Fig. 4)
    tokenizer_scales        multi-scale vs full-scale-only tokenizer at every scale (paper Fig. 3)
    make_generation_figures schedules, sizes, aspect ratios and edits from one trained model
    mlflow_ui_tour          the MLflow UI walked in a real browser: runs table, FID chart, run page,
                            model registry, with screenshots
    dvc_plots_shots         every declared plot of dvc.yaml as `dvc plots show` draws it in a real browser
"""
