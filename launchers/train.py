"""What the deepspeed launcher runs on each rank:

    deepspeed --num_gpus 8 launchers/train.py --recipe recipes/qwen2.5-7b-to-0.5b.yaml [key.path=value ...]

All logic lives in kd.launch (so `deepspeed --module kd.launch` works too, also from a non-editable install).
"""
import sys

from kd.launch import main

if __name__ == "__main__":
    sys.exit(main())
