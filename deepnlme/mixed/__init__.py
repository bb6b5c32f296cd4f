"""Formula mixed models with crossed and nested random effects (lme4's stages).

formula (:mod:`.formula`) -> design (:mod:`.design`, gathers) -> objective (:mod:`.lmm`
profiled deviance, :mod:`.glmm` Laplace) -> optimizer (:mod:`.optimizer`) -> result
(:mod:`.result`).
"""
