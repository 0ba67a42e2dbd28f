"""What the deepspeed launcher runs on each rank:

    deepspeed --num_gpus 8 launchers/train.py --recipe recipes/qwen2.5-7b-to-0.5b.yaml [key.path=value ...]

All logic lives in kd.launch (so `deepspeed --module kd.launch` works too, also from a non-editable install).
"""

from kd.launch import main

if __name__ == "__main__":
    from kd.engine.dist import exit_process

    exit_process(main())  # a rank's process ends without the interpreter's teardown (see exit_process)
