module finetune-example

go 1.19

require finetune v0.0.0

replace finetune => ../../bindings/go
