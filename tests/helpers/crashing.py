"""A dataset that fails at one sample, as a crashed loader or a killed job would: for resume tests."""
import torch


class Exploding(torch.utils.data.Dataset):
    def __init__(self, data, at):
        self.data, self.at = data, at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.at:
            raise RuntimeError("simulated crash")
        return self.data[i]
