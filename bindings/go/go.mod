module finetune

go 1.19
