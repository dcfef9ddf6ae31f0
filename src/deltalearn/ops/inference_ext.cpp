// DDL's per-token work without autograd, called from Python with its tensors as they are
// (`ops/extension.py` builds and loads this module):
//
//   update        a DeltaUpdate: gate and value projections, rewrite, optional compressor read
//   channel_read  a CC read of the state, with the folded (d, dv) matrix it took
//   token_read    a TC read that first appends the new states to the cache's spare buffer
//   expand        the EC expansion, appending the new embeddings to the cache's buffer first
//
// Decoding one token at a time is bound by host work: through ctypes, each of these cost a dozen
// Python-level checks (shapes, layouts, weight stamps), a folded-weight lookup and an argument
// conversion per token, and the cache appends a few dispatched ops more. Here the checks read the
// tensors' metadata in C++, the weights are folded in C++ (a few thousand multiplies), and the C
// kernels of `native_kernels.c` (their addresses handed over by `set_kernel`) run straight after:
// about the host time of one dispatched ATen op each. Where anything does not fit — autograd or
// CPU autocast on, a tensor that is not a plain contiguous CPU tensor of the state's dtype, shapes
// that disagree — a function returns None, writes nothing, and the caller takes its general path,
// which names what is wrong.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/EmptyTensor.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstring>
#include <type_traits>
#include <vector>

namespace {

template <typename Real>
using UpdateKernel = int (*)(int64_t N, int64_t d, int64_t dv, const Real *X, const Real *h,
                             const Real *c, const Real *u, const Real *w_gate, const Real *b_gate,
                             const Real *W_value, const Real *b_value, const Real *C, int delta,
                             int official, double scale, double eps, Real *Y, Real *x_next,
                             int threads);

// read: xs (B, S, d, dv) with S = past + T, taps (K, d, dv), out (B, T, d);
// expand: e (B, S, d), taps (K, d, dv), out (B, T, d, dv). Both with `past` earlier inputs first.
template <typename Real>
using ConvKernel = int (*)(int64_t B, int64_t S, int64_t past, int64_t d, int64_t dv, int64_t K,
                           const Real *xs, const Real *taps, Real *out, int threads);

template <typename Real>
struct Kernels {
    UpdateKernel<Real> update = nullptr;
    ConvKernel<Real> read = nullptr;
    ConvKernel<Real> expand = nullptr;
};
Kernels<float> kernels_f32;
Kernels<double> kernels_f64;

// Above this many elements of work a kernel runs without the GIL (a full-sequence forward).
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

// Whether `o` is a tensor (nn.Parameter included): a subtype check, not THPVariable_Check's
// isinstance, which runs nn.Parameter's metaclass hook (~0.5 µs an argument).
bool is_tensor(PyObject *o) {
    return THPVariableClass != nullptr &&
           (THPVariable_CheckExact(o) ||
            PyType_IsSubtype(Py_TYPE(o), reinterpret_cast<PyTypeObject *>(THPVariableClass)));
}

// The tensor behind `o`, if it is one and its data lie as a plain contiguous CPU array of `dtype`.
const at::Tensor *plain(PyObject *o, at::ScalarType dtype) {
    if (!is_tensor(o)) return nullptr;
    const at::Tensor &t = THPVariable_Unpack(o);
    const bool ok = t.defined() && t.device().is_cpu() && t.layout() == at::kStrided &&
                    !t.is_nested() && t.scalar_type() == dtype && t.is_contiguous() &&
                    !t.key_set().has_any(WRAPPED);
    return ok ? &t : nullptr;
}

// The dtype of `first` where a kernel may run now — no autograd, no CPU autocast, `first` a tensor
// of float or double and the kernel `has` picks from `Kernels` set for it — else Undefined.
template <typename Has>
at::ScalarType kernel_dtype(PyObject *first, Has has) {
    if (at::GradMode::is_enabled() || at::autocast::is_autocast_enabled(at::kCPU) ||
        !is_tensor(first)) {
        return at::ScalarType::Undefined;
    }
    const at::ScalarType dtype = THPVariable_Unpack(first).scalar_type();
    const bool set =
        dtype == at::kFloat ? has(kernels_f32) : dtype == at::kDouble && has(kernels_f64);
    return set ? dtype : at::ScalarType::Undefined;
}

// f(std::integral_constant<int64_t, DV>{}) with DV = dv for the usual value axes (1, 2, 4, 8: the
// loops over it unroll and vectorise), else DV = 0 (those loops read dv at run time).
template <typename F>
auto with_dv(int64_t dv, F f) {
    switch (dv) {
        case 1: return f(std::integral_constant<int64_t, 1>{});
        case 2: return f(std::integral_constant<int64_t, 2>{});
        case 4: return f(std::integral_constant<int64_t, 4>{});
        case 8: return f(std::integral_constant<int64_t, 8>{});
        default: return f(std::integral_constant<int64_t, 0>{});
    }
}

bool check_count(const char *name, Py_ssize_t nargs, Py_ssize_t want) {
    if (nargs == want) return true;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, want, nargs);
    return false;
}

// Run `call` (returning the kernel's code), without the GIL for large work; false (a Python
// error set) where the kernel failed.
template <typename Call>
bool run_kernel(const char *name, int64_t work, Call call) {
    int code;
    if (work >= RELEASE_GIL_FROM) {
        Py_BEGIN_ALLOW_THREADS code = call();
        Py_END_ALLOW_THREADS
    } else {
        code = call();
    }
    if (code == 0) return true;
    PyErr_Format(PyExc_RuntimeError, "deltalearn CPU kernel %s failed (code %d)", name, code);
    return false;
}

// A new contiguous CPU tensor, allocated without the dispatcher (a decoded token allocates a few
// dozen of these; at::empty's dispatch costs more than the allocation).
at::Tensor new_cpu(at::IntArrayRef sizes, const at::Tensor &like) {
    return at::Tensor(at::detail::empty_cpu(sizes, like.scalar_type()));
}

PyObject *pair(at::Tensor a, at::Tensor b) {
    PyObject *out = PyTuple_New(2);
    if (out == nullptr) return nullptr;
    PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(a)));
    PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(b)));
    return out;
}

template <typename Real>
const Real *data(const at::Tensor *t) {
    return t == nullptr ? nullptr : t->const_data_ptr<Real>();
}

// ---- update -------------------------------------------------------------------------------------

template <typename Real>
PyObject *run_update(const Kernels<Real> &k, const at::Tensor *const *t, const at::Tensor *b_value,
                     const at::Tensor *C, int64_t N, int64_t d, int64_t dv, int delta,
                     int official, double scale, double eps) {
    const at::Tensor &X = *t[0], &h = *t[1];
    at::Tensor Y = new_cpu(X.sizes(), X);
    at::Tensor x_next = C == nullptr ? at::Tensor() : new_cpu(h.sizes(), h);
    Real *x_next_data = C == nullptr ? nullptr : x_next.mutable_data_ptr<Real>();
    const int threads = at::get_num_threads();
    const bool ok = run_kernel("update_forward", N * d * dv, [&] {
        return k.update(N, d, dv, X.const_data_ptr<Real>(), h.const_data_ptr<Real>(),
                        t[2]->const_data_ptr<Real>(), t[3]->const_data_ptr<Real>(),
                        t[4]->const_data_ptr<Real>(), t[5]->const_data_ptr<Real>(),
                        t[6]->const_data_ptr<Real>(), data<Real>(b_value), data<Real>(C), delta,
                        official, scale, eps, Y.mutable_data_ptr<Real>(), x_next_data, threads);
    });
    if (!ok) return nullptr;
    if (C == nullptr) return THPVariable_Wrap(std::move(Y));
    return pair(std::move(Y), std::move(x_next));
}

// update(X, h, c, u, w_gate, b_gate, W_value, b_value | None, C | None, delta, official, scale,
//        eps) -> Y | (Y, x_next) | None.  X (..., d) or (..., d, dv); h, c, u (..., d); w_gate
// (d) or (1, d); b_gate one value; W_value (dv, d); b_value (dv); C the (d, dv) compressor matrix
// whose read of Y comes back too. delta, official: bools; scale, eps: floats.
PyObject *update(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_count("update", nargs, 13)) return nullptr;
    const auto dtype = kernel_dtype(args[0], [](const auto &k) { return k.update != nullptr; });
    if (dtype == at::ScalarType::Undefined) Py_RETURN_NONE;
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
        return run_update(kernels_f32, t, b_value, C, N, d, dv, delta, official, scale, eps);
    }
    return run_update(kernels_f64, t, b_value, C, N, d, dv, delta, official, scale, eps);
}

// ---- channel read -------------------------------------------------------------------------------

// A few tokens (decoding) are read straight from the unfolded weights, without a C kernel: folding
// the read vector into the taps is as much work as such a read itself, and the kernel's set-up
// (a scratch buffer, an OpenMP region) more.
constexpr int64_t UNFOLDED_READ_ROWS = 4;

// channel_read(X, weight, read) -> (x, C) | None.  X (..., d, dv); weight (d, K) the taps of the
// "same"-padded conv along the value axis (K <= dv), read (dv). C[i, j] = sum_t w[i, t] ·
// read[j - t + p] with p = (K - 1) / 2 (read is 0 outside [0, dv)), as `ChannelCompressor.
// mixing_matrix` folds it; x[..., i] = sum_j C[i, j] X[..., i, j].
template <typename Real>
PyObject *run_channel_read(const Kernels<Real> &k, const at::Tensor &X, const at::Tensor &weight,
                           const at::Tensor &read) {
    const int64_t d = X.size(-2), dv = X.size(-1), K = weight.size(1), p = (K - 1) / 2;
    const Real *w = weight.const_data_ptr<Real>(), *r = read.const_data_ptr<Real>();
    // R[t, j] = read[j - t + p] (0 outside), then C = w R: no branch in the d-long loop.
    std::vector<Real> R(K * dv, Real(0));
    for (int64_t t = 0; t < K; t++)
        for (int64_t j = 0; j < dv; j++)
            if (j - t + p >= 0 && j - t + p < dv) R[t * dv + j] = r[j - t + p];
    at::Tensor C = new_cpu({d, dv}, X);
    Real *c = C.mutable_data_ptr<Real>();
    std::vector<int64_t> shape(X.sizes().begin(), X.sizes().end() - 1);
    at::Tensor x = new_cpu(shape, X);
    const int64_t rows = X.numel() / (d * dv);
    const Real *xs = X.const_data_ptr<Real>();
    Real *out = x.mutable_data_ptr<Real>();
    const bool unfolded = rows <= UNFOLDED_READ_ROWS;
    with_dv(dv, [&](auto DV) {
        const int64_t n_dv = DV ? DV : dv;
        for (int64_t i = 0; i < d; i++) {
            Real *ci = c + i * n_dv;
            if constexpr (DV > 0) {  // in registers: c may alias nothing the compiler can prove
                Real acc[DV] = {};
                for (int64_t t = 0; t < K; t++)
                    for (int64_t j = 0; j < DV; j++) acc[j] += w[i * K + t] * R[t * DV + j];
                for (int64_t j = 0; j < DV; j++) ci[j] = acc[j];
            } else {
                for (int64_t j = 0; j < n_dv; j++) ci[j] = 0;
                for (int64_t t = 0; t < K; t++)
                    for (int64_t j = 0; j < n_dv; j++) ci[j] += w[i * K + t] * R[t * n_dv + j];
            }
        }
        if (!unfolded) return 0;
        for (int64_t n = 0; n < rows; n++) {
            for (int64_t i = 0; i < d; i++) {
                const Real *xi = xs + (n * d + i) * n_dv, *ci = c + i * n_dv;
                Real sum = 0;
                for (int64_t j = 0; j < n_dv; j++) sum += ci[j] * xi[j];
                out[n * d + i] = sum;
            }
        }
        return 0;
    });
    bool ok = true;
    if (!unfolded) {
        const int threads = at::get_num_threads();
        ok = run_kernel("read_forward", rows * d * dv,
                        [&] { return k.read(1, rows, 0, d, dv, 1, xs, c, out, threads); });
    }
    if (!ok) return nullptr;
    return pair(std::move(x), std::move(C));
}

PyObject *channel_read(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_count("channel_read", nargs, 3)) return nullptr;
    const auto dtype = kernel_dtype(args[0], [](const auto &k) { return k.read != nullptr; });
    if (dtype == at::ScalarType::Undefined) Py_RETURN_NONE;
    const at::Tensor *X = plain(args[0], dtype), *weight = plain(args[1], dtype),
                     *read = plain(args[2], dtype);
    if (X == nullptr || weight == nullptr || read == nullptr || X->dim() < 2 ||
        X->numel() == 0 || weight->dim() != 2 || read->dim() != 1) {
        Py_RETURN_NONE;
    }
    const int64_t d = X->size(-2), dv = X->size(-1), K = weight->size(1);
    if (weight->size(0) != d || K < 1 || K > dv || read->size(0) != dv) Py_RETURN_NONE;
    if (dtype == at::kFloat) return run_channel_read(kernels_f32, *X, *weight, *read);
    return run_channel_read(kernels_f64, *X, *weight, *read);
}

// ---- token-axis convolutions reading the cache's buffer -----------------------------------------

// What the two cached convolutions share: `buffer` (B, capacity, *feature), the cache's spare
// buffer, whose front `seen` (B, n, *feature) — a narrowing of it — holds the n inputs seen so far;
// `inputs` (B, T, *feature) are written after them, and the kernel reads, per batch row, the last
// `past` = min(K - 1, n) earlier inputs and the T new ones where they lie.
struct Window {
    const at::Tensor *buffer, *inputs;
    int64_t n, T, row;  // row: elements per token
};

// The window, if `seen` is the front of `buffer`, which has room for `inputs` after it, and all
// three lie plainly in `dtype`.
bool window_of(PyObject *buffer, PyObject *seen, PyObject *inputs, int64_t feature_dims,
               at::ScalarType dtype, Window &w) {
    w.buffer = plain(buffer, dtype);
    w.inputs = plain(inputs, dtype);
    if (w.buffer == nullptr || w.inputs == nullptr || !is_tensor(seen)) return false;
    const at::Tensor &b = *w.buffer, &x = *w.inputs, &s = THPVariable_Unpack(seen);
    if (b.dim() != 2 + feature_dims || x.dim() != b.dim() || s.dim() != b.dim() ||
        x.size(0) != b.size(0) || s.size(0) != b.size(0) || x.numel() == 0 ||
        !x.sizes().slice(2).equals(b.sizes().slice(2)) ||
        !s.sizes().slice(2).equals(b.sizes().slice(2))) {
        return false;
    }
    // seen: the buffer's first n inputs, as `buffer.narrow(1, 0, n)` gives them
    const bool front = s.defined() && s.scalar_type() == dtype && s.device().is_cpu() &&
                       !s.key_set().has_any(WRAPPED) && s.layout() == at::kStrided &&
                       s.storage().is_alias_of(b.storage()) &&
                       s.storage_offset() == b.storage_offset() && s.strides().equals(b.strides());
    if (!front) return false;
    w.n = s.size(1);
    w.T = x.size(1);
    w.row = x.numel() / (x.size(0) * w.T);
    return w.n + w.T <= b.size(1);
}

// An appending call's window over (buffer, seen, inputs) = args[0..2], and the dtype of the
// kernel `has` asks for: Undefined (the call returns None) where there is no such kernel for the
// buffer's dtype or `window_of` declines.
template <typename Has>
at::ScalarType appending_window(PyObject *const *args, int64_t feature_dims, Has has, Window &w) {
    const auto dtype = kernel_dtype(args[0], has);
    if (dtype == at::ScalarType::Undefined) return dtype;
    const bool fits = window_of(args[0], args[1], args[2], feature_dims, dtype, w);
    return fits ? dtype : at::ScalarType::Undefined;
}

// `buffer.narrow(1, 0, n)` made without the dispatcher: a tensor on the buffer's storage with its
// strides and n along the token axis, sharing its version counter as a view does (no `_base`).
// The dispatched narrow (slice, then as_strided) took ~2.5 µs a call inside a decode loop, where
// its code is cold at every token — about what the read itself takes.
at::Tensor front_of(const at::Tensor &buffer, int64_t n) {
    at::DimVector sizes(buffer.sizes());  // on the stack: no allocation a call
    sizes[1] = n;
    auto view = at::detail::make_tensor<c10::TensorImpl>(
        c10::TensorImpl::VIEW, c10::Storage(buffer.storage()), buffer.key_set(), buffer.dtype());
    c10::TensorImpl *impl = view.unsafeGetTensorImpl();
    impl->set_sizes_and_strides(sizes, buffer.strides(), buffer.storage_offset());
    if (!buffer.is_inference()) {
        impl->set_version_counter(buffer.unsafeGetTensorImpl()->version_counter());
    }
    return view;
}

// (out, the buffer's first n + T inputs): what an appending call returns.
PyObject *with_seen(at::Tensor out, const Window &w) {
    return pair(std::move(out), front_of(*w.buffer, w.n + w.T));
}

// Append the window's inputs to its buffer, then run `kernel(batch row, earlier inputs, first
// element read)` per batch row; false (a Python error set) where a kernel failed.
template <typename Real, typename Kernel>
bool append_and_run(const Window &w, int64_t K, const char *name, Kernel kernel) {
    const int64_t B = w.buffer->size(0), capacity = w.buffer->size(1);
    const int64_t past = std::min(K - 1, w.n);
    Real *buffer = w.buffer->mutable_data_ptr<Real>();
    const Real *inputs = w.inputs->const_data_ptr<Real>();
    for (int64_t b = 0; b < B; b++) {
        std::memcpy(buffer + (b * capacity + w.n) * w.row, inputs + b * w.T * w.row,
                    sizeof(Real) * w.T * w.row);
    }
    // An in-place write, recorded as copy_ would record it (inference tensors keep no version).
    if (!w.buffer->is_inference()) w.buffer->unsafeGetTensorImpl()->bump_version();
    for (int64_t b = 0; b < B; b++) {
        const Real *first = buffer + (b * capacity + w.n - past) * w.row;
        if (!run_kernel(name, w.T * w.row * K, [&] { return kernel(b, past, first); })) {
            return false;
        }
    }
    return true;
}

// x[i] = sum_tau sum_j read[j] w[i, j, tau] X[t - (K - 1 - tau), i, j] of the window at `first`
// (the `past` earlier inputs, then the new ones), for new token t: tap by tap, the taps before the
// first input skipped outside the d-long loop.
template <int64_t DV, typename Real>
void read_unfolded(int64_t d, int64_t dv_, int64_t K, int64_t past, int64_t t, const Real *first,
                   const Real *w, const Real *read, Real *x) {
    const int64_t dv = DV ? DV : dv_;
    for (int64_t i = 0; i < d; i++) x[i] = 0;
    for (int64_t tau = 0; tau < K; tau++) {
        const int64_t src = past + t - (K - 1 - tau);
        if (src < 0) continue;
        const Real *xs = first + src * d * dv;
        for (int64_t i = 0; i < d; i++) {
            Real sum = 0;
            for (int64_t j = 0; j < dv; j++)
                sum += read[j] * w[(i * dv + j) * K + tau] * xs[i * dv + j];
            x[i] += sum;
        }
    }
}

template <typename Real>
PyObject *run_token_read(const Kernels<Real> &k, const Window &w, const at::Tensor &weight,
                         const at::Tensor &read) {
    const int64_t d = weight.size(0), dv = weight.size(1), K = weight.size(2);
    const int64_t B = w.inputs->size(0), T = w.T;
    const Real *wt = weight.const_data_ptr<Real>(), *r = read.const_data_ptr<Real>();
    at::Tensor x = new_cpu({B, T, d}, *w.inputs);
    Real *out = x.mutable_data_ptr<Real>();
    bool ok;
    if (B * T <= UNFOLDED_READ_ROWS) {
        ok = append_and_run<Real>(w, K, "read", [&](int64_t b, int64_t past, const Real *first) {
            with_dv(dv, [&](auto DV) {
                for (int64_t t = 0; t < T; t++)
                    read_unfolded<DV>(d, dv, K, past, t, first, wt, r, out + (b * T + t) * d);
                return 0;
            });
            return 0;
        });
    } else {
        std::vector<Real> taps(K * d * dv);  // (K, d, dv): tap-major, as the kernel reads them
        for (int64_t i = 0; i < d; i++)
            for (int64_t j = 0; j < dv; j++)
                for (int64_t tau = 0; tau < K; tau++)
                    taps[(tau * d + i) * dv + j] = wt[(i * dv + j) * K + tau] * r[j];
        const int threads = at::get_num_threads();
        ok = append_and_run<Real>(w, K, "read_forward", [&](int64_t b, int64_t past,
                                                             const Real *first) {
            return k.read(1, past + T, past, d, dv, K, first, taps.data(), out + b * T * d,
                          threads);
        });
    }
    return ok ? with_seen(std::move(x), w) : nullptr;
}

// token_read(buffer, seen, X, weight, read) -> (x_in, seen') | None.  buffer (B, capacity, d, dv),
// seen its first n inputs, X (B, T, d, dv), weight (d, dv, K), read (dv): writes X into
// buffer[:, n : n + T], then reads the last min(K - 1, n) inputs before it and X with the taps
// weight[i, j, tau] · read[j] (tap K - 1 the current token), as `TokenCompressor.read_inputs`.
// x_in (B, T, d); seen' the buffer's first n + T inputs.
PyObject *token_read(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_count("token_read", nargs, 5)) return nullptr;
    Window w;
    const auto dtype =
        appending_window(args, 2, [](const auto &k) { return k.read != nullptr; }, w);
    if (dtype == at::ScalarType::Undefined) Py_RETURN_NONE;
    const at::Tensor *weight = plain(args[3], dtype), *read = plain(args[4], dtype);
    if (weight == nullptr || read == nullptr || weight->dim() != 3 || read->dim() != 1 ||
        weight->size(0) != w.inputs->size(2) || weight->size(1) != w.inputs->size(3) ||
        weight->size(2) < 1 || read->size(0) != weight->size(1)) {
        Py_RETURN_NONE;
    }
    if (dtype == at::kFloat) return run_token_read(kernels_f32, w, *weight, *read);
    return run_token_read(kernels_f64, w, *weight, *read);
}

template <typename Real>
PyObject *run_expand(const Kernels<Real> &k, const Window &w, const at::Tensor &weight) {
    const int64_t d = w.inputs->size(2), dv = weight.size(0) / d, K = weight.size(2);
    const int64_t B = w.inputs->size(0), T = w.T;
    const Real *wt = weight.const_data_ptr<Real>();
    at::Tensor X = new_cpu({B, T, d, dv}, *w.inputs);
    Real *out = X.mutable_data_ptr<Real>();
    bool ok;
    if (B * T <= UNFOLDED_READ_ROWS) {  // X[t, i, j] = sum_tau w[i·dv + j, tau] e[t - (K-1-tau), i]
        ok = append_and_run<Real>(w, K, "expand", [&](int64_t b, int64_t past, const Real *first) {
            return with_dv(dv, [&](auto DV) {
                const int64_t n_dv = DV ? DV : dv;
                for (int64_t t = 0; t < T; t++) {
                    Real *o = out + (b * T + t) * d * n_dv;
                    const int64_t first_tau = std::max<int64_t>(K - 1 - past - t, 0);
                    const Real *e = first + (past + t - (K - 1 - first_tau)) * d;
                    for (int64_t i = 0; i < d; i++) {
                        for (int64_t j = 0; j < n_dv; j++) {
                            const Real *wq = wt + (i * n_dv + j) * K;
                            Real sum = 0;
                            for (int64_t tau = first_tau; tau < K; tau++)
                                sum += wq[tau] * e[(tau - first_tau) * d + i];
                            o[i * n_dv + j] = sum;
                        }
                    }
                }
                return 0;
            });
        });
    } else {
        std::vector<Real> taps(K * d * dv);  // (K, d, dv)
        for (int64_t q = 0; q < d * dv; q++)
            for (int64_t tau = 0; tau < K; tau++) taps[tau * d * dv + q] = wt[q * K + tau];
        const int threads = at::get_num_threads();
        ok = append_and_run<Real>(w, K, "expand_forward", [&](int64_t b, int64_t past,
                                                               const Real *first) {
            return k.expand(1, past + T, past, d, dv, K, first, taps.data(),
                            out + b * T * d * dv, threads);
        });
    }
    return ok ? with_seen(std::move(X), w) : nullptr;
}

// expand(buffer, seen, e, weight) -> (X_0, seen') | None.  buffer (B, capacity, d), seen its first
// n embeddings, e (B, T, d), weight (d·dv, 1, K) in nn.Conv1d layout (output channel i·dv + j reads
// feature i): writes e into buffer[:, n : n + T], then expands the last min(K - 1, n) embeddings
// before it and e, as `EmbeddingConv.expand_inputs`. X_0 (B, T, d, dv); seen' as for token_read.
PyObject *expand(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_count("expand", nargs, 4)) return nullptr;
    Window w;
    const auto dtype =
        appending_window(args, 1, [](const auto &k) { return k.expand != nullptr; }, w);
    if (dtype == at::ScalarType::Undefined) Py_RETURN_NONE;
    const at::Tensor *weight = plain(args[3], dtype);
    const int64_t d = w.inputs->size(2);
    if (weight == nullptr || weight->dim() != 3 || weight->size(1) != 1 || weight->size(2) < 1 ||
        weight->size(0) < d || weight->size(0) % d != 0) {
        Py_RETURN_NONE;
    }
    if (dtype == at::kFloat) return run_expand(kernels_f32, w, *weight);
    return run_expand(kernels_f64, w, *weight);
}

// ---- set-up -------------------------------------------------------------------------------------

// set_kernel(name, address of name_f32, address of name_f64): a C kernel's entry points, as ctypes
// loaded them (`native_build.library()`); name one of update_forward, read_forward, expand_forward.
PyObject *set_kernel(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (!check_count("set_kernel", nargs, 3)) return nullptr;
    const char *name = PyUnicode_AsUTF8(args[0]);
    if (name == nullptr) return nullptr;
    void *f32 = PyLong_AsVoidPtr(args[1]), *f64 = PyLong_AsVoidPtr(args[2]);
    if (PyErr_Occurred()) return nullptr;
    if (std::strcmp(name, "update_forward") == 0) {
        kernels_f32.update = reinterpret_cast<UpdateKernel<float>>(f32);
        kernels_f64.update = reinterpret_cast<UpdateKernel<double>>(f64);
    } else if (std::strcmp(name, "read_forward") == 0) {
        kernels_f32.read = reinterpret_cast<ConvKernel<float>>(f32);
        kernels_f64.read = reinterpret_cast<ConvKernel<double>>(f64);
    } else if (std::strcmp(name, "expand_forward") == 0) {
        kernels_f32.expand = reinterpret_cast<ConvKernel<float>>(f32);
        kernels_f64.expand = reinterpret_cast<ConvKernel<double>>(f64);
    } else {
        PyErr_Format(PyExc_ValueError, "no kernel named %s", name);
        return nullptr;
    }
    Py_RETURN_NONE;
}

template <PyObject *(*F)(PyObject *, PyObject *const *, Py_ssize_t)>
PyCFunction fastcall() {
    return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(F));
}

PyMethodDef methods[] = {
    {"update", fastcall<update>(), METH_FASTCALL, "A DeltaUpdate, or None."},
    {"channel_read", fastcall<channel_read>(), METH_FASTCALL, "A CC read and its matrix, or None."},
    {"token_read", fastcall<token_read>(), METH_FASTCALL, "Append, then a TC read; or None."},
    {"expand", fastcall<expand>(), METH_FASTCALL, "Append, then the EC expansion; or None."},
    {"set_kernel", fastcall<set_kernel>(), METH_FASTCALL, "A C kernel's entry points."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "deltalearn_inference_ext", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_deltalearn_inference_ext() { return PyModule_Create(&module); }
