// A DDL sublayer's whole update without autograd, called from Python with its tensors as they are
// (`ops/extension.py` builds and loads this module; `DeltaUpdate.forward` calls it).
//
// Decoding one token at a time is bound by host work: through ctypes, one update costs a dozen
// Python-level checks (shapes, layouts, weight stamps) and an argument conversion each token. Here
// the checks read the tensors' metadata in C++ and the C kernel (`update_forward` of
// `native_kernels.c`, its address handed over by `set_kernels`) runs straight after: about the
// host time of one dispatched ATen op. Where anything does not fit — autograd or CPU autocast on,
// a tensor that is not a plain contiguous CPU tensor of the state's dtype, shapes that disagree —
// `update` returns None and the caller takes its general path, which names what is wrong.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

template <typename Real>
using UpdateKernel = int (*)(int64_t N, int64_t d, int64_t dv, const Real *X, const Real *h,
                             const Real *c, const Real *u, const Real *w_gate, const Real *b_gate,
                             const Real *W_value, const Real *b_value, const Real *C, int delta,
                             int official, double scale, double eps, Real *Y, Real *x_next,
                             int threads);

UpdateKernel<float> update_f32 = nullptr;
UpdateKernel<double> update_f64 = nullptr;

// Above this many state elements the kernel runs without the GIL (a full-sequence forward).
constexpr int64_t RELEASE_GIL_FROM = 1 << 16;

// Tensors whose data a C kernel cannot read as a plain array: subclasses that intercept dispatch,
// functorch wrappers, lazy negation/conjugation, functionalization, zero tensors.
const c10::DispatchKeySet WRAPPED({
    c10::DispatchKey::Python,
    c10::DispatchKey::FuncTorchBatched,
    c10::DispatchKey::FuncTorchGradWrapper,
    c10::DispatchKey::Functionalize,
    c10::DispatchKey::Conjugate,
    c10::DispatchKey::Negative,
    c10::DispatchKey::ZeroTensor,
});

// The tensor behind `o`, if it is one and its data lie as a plain contiguous CPU array of `dtype`.
const at::Tensor *plain(PyObject *o, at::ScalarType dtype) {
    if (!THPVariable_Check(o)) return nullptr;
    const at::Tensor &t = THPVariable_Unpack(o);
    const bool ok = t.defined() && t.device().is_cpu() && t.layout() == at::kStrided &&
                    !t.is_nested() && t.scalar_type() == dtype && t.is_contiguous() &&
                    !t.key_set().has_any(WRAPPED);
    return ok ? &t : nullptr;
}

template <typename Real>
const Real *data(const at::Tensor *t) {
    return t == nullptr ? nullptr : t->const_data_ptr<Real>();
}

template <typename Real>
PyObject *run(UpdateKernel<Real> kernel, const at::Tensor &X, const at::Tensor &h,
              const at::Tensor &c, const at::Tensor &u, const at::Tensor &w_gate,
              const at::Tensor &b_gate, const at::Tensor &W_value, const at::Tensor *b_value,
              const at::Tensor *C, int64_t N, int64_t d, int64_t dv, int delta, int official,
              double scale, double eps) {
    at::Tensor Y = at::empty_like(X);
    at::Tensor x_next = C == nullptr ? at::Tensor() : at::empty_like(h);
    Real *x_next_data = C == nullptr ? nullptr : x_next.mutable_data_ptr<Real>();
    const int threads = at::get_num_threads();
    int code;
    auto call = [&] {
        return kernel(N, d, dv, X.const_data_ptr<Real>(), h.const_data_ptr<Real>(),
                      c.const_data_ptr<Real>(), u.const_data_ptr<Real>(),
                      w_gate.const_data_ptr<Real>(), b_gate.const_data_ptr<Real>(),
                      W_value.const_data_ptr<Real>(), data<Real>(b_value), data<Real>(C), delta,
                      official, scale, eps, Y.mutable_data_ptr<Real>(), x_next_data, threads);
    };
    if (N * d * dv >= RELEASE_GIL_FROM) {
        Py_BEGIN_ALLOW_THREADS code = call();
        Py_END_ALLOW_THREADS
    } else {
        code = call();
    }
    if (code != 0) {
        PyErr_Format(PyExc_RuntimeError, "deltalearn CPU kernel update_forward failed (code %d)",
                     code);
        return nullptr;
    }
    if (C == nullptr) return THPVariable_Wrap(std::move(Y));
    PyObject *pair = PyTuple_New(2);
    if (pair == nullptr) return nullptr;
    PyTuple_SET_ITEM(pair, 0, THPVariable_Wrap(std::move(Y)));
    PyTuple_SET_ITEM(pair, 1, THPVariable_Wrap(std::move(x_next)));
    return pair;
}

// update(X, h, c, u, w_gate, b_gate, W_value, b_value | None, C | None, delta, official, scale,
//        eps) -> Y | (Y, x_next) | None.  X (..., d) or (..., d, dv); h, c, u (..., d); w_gate
// (d) or (1, d); b_gate one value; W_value (dv, d); b_value (dv); C the (d, dv) compressor matrix
// whose read of Y comes back too. delta, official: bools; scale, eps: floats.
PyObject *update(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 13) {
        PyErr_Format(PyExc_TypeError, "update takes 13 arguments, got %zd", nargs);
        return nullptr;
    }
    if (at::GradMode::is_enabled() || at::autocast::is_autocast_enabled(at::kCPU)) Py_RETURN_NONE;
    if (!THPVariable_Check(args[0])) Py_RETURN_NONE;
    const at::ScalarType dtype = THPVariable_Unpack(args[0]).scalar_type();
    if (dtype == at::kFloat ? update_f32 == nullptr
                            : dtype != at::kDouble || update_f64 == nullptr) {
        Py_RETURN_NONE;
    }
    const at::Tensor *t[7];
    for (int i = 0; i < 7; i++) {
        t[i] = plain(args[i], dtype);
        if (t[i] == nullptr) Py_RETURN_NONE;
    }
    const at::Tensor &X = *t[0], &h = *t[1], &c = *t[2], &u = *t[3];
    const at::Tensor &w_gate = *t[4], &b_gate = *t[5], &W_value = *t[6];
    if (h.dim() < 1 || h.size(-1) < 1 || h.numel() == 0 || W_value.dim() != 2) Py_RETURN_NONE;
    const int64_t d = h.size(-1), N = h.numel() / d, dv = W_value.size(0);
    const bool vector = X.dim() == h.dim();
    const bool state_fits = vector ? dv == 1 && X.sizes().equals(h.sizes())
                                   : X.dim() == h.dim() + 1 && X.size(-1) == dv &&
                                         X.sizes().slice(0, h.dim()).equals(h.sizes());
    if (!state_fits || !c.sizes().equals(h.sizes()) || !u.sizes().equals(h.sizes()) ||
        w_gate.numel() != d || b_gate.numel() != 1 || W_value.size(1) != d) {
        Py_RETURN_NONE;
    }
    const at::Tensor *b_value = nullptr, *C = nullptr;
    if (args[7] != Py_None) {
        b_value = plain(args[7], dtype);
        if (b_value == nullptr || b_value->numel() != dv) Py_RETURN_NONE;
    }
    if (args[8] != Py_None) {
        C = plain(args[8], dtype);
        if (vector || C == nullptr || C->dim() != 2 || C->size(0) != d || C->size(1) != dv) {
            Py_RETURN_NONE;
        }
    }
    const int delta = PyObject_IsTrue(args[9]), official = PyObject_IsTrue(args[10]);
    const double scale = PyFloat_AsDouble(args[11]), eps = PyFloat_AsDouble(args[12]);
    if (delta < 0 || official < 0 || PyErr_Occurred()) return nullptr;
    if (dtype == at::kFloat) {
        return run<float>(update_f32, X, h, c, u, w_gate, b_gate, W_value, b_value, C, N, d, dv,
                          delta, official, scale, eps);
    }
    return run<double>(update_f64, X, h, c, u, w_gate, b_gate, W_value, b_value, C, N, d, dv,
                       delta, official, scale, eps);
}

// set_kernels(address of update_forward_f32, address of update_forward_f64): the C kernels'
// entry points, as ctypes loaded them (`native_build.library()`).
PyObject *set_kernels(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "set_kernels takes 2 addresses, got %zd", nargs);
        return nullptr;
    }
    void *f32 = PyLong_AsVoidPtr(args[0]), *f64 = PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred()) return nullptr;
    update_f32 = reinterpret_cast<UpdateKernel<float>>(f32);
    update_f64 = reinterpret_cast<UpdateKernel<double>>(f64);
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"update", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(update)),
     METH_FASTCALL, "A DDL update without autograd, or None where it does not apply."},
    {"set_kernels", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_kernels)),
     METH_FASTCALL, "The C kernels' entry points (addresses)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "deltalearn_inference_ext", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_deltalearn_inference_ext() { return PyModule_Create(&module); }
