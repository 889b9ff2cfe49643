//! Activations the upscalers share.

use tch::Tensor;

/// LeakyReLU of `slope`, written over `x` as the references' in-place LeakyReLU does
/// (the full-resolution features are a tile's largest tensors): torch's own kernel, its
/// backward with the input as the gradient (`x > 0 ? x : x * slope`), since tch's
/// `leaky_relu` takes no slope.
pub fn leaky_in_place(x: Tensor, slope: f64) -> Tensor {
    let _ = x.leaky_relu_backward_grad_input(&x, &x, slope, false);
    x
}
