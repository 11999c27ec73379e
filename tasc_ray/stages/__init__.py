"""Ray stages: the corpus index job (Ray Data, `index_job`), batch labeling (a Ray Data stage and its resumable job,
`labeling`, committing through `commit`), fine-tuning (Ray Train, `finetune`), Ray Datasets over `tasc_ray.io`
inputs (`datasets`) and Ray start-up (`runtime`)."""
