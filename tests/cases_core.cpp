// Op cases for the elementwise, reduce, matmul and shape families (see op_harness.h).
#include <cmath>

#include "autograd/op_util.h"
#include "op_harness.h"

namespace psa::test {
namespace {

// Naive numpy broadcasting over f64 host data.
Tensor ref_binary(const Tensor& a, const Tensor& b, double (*f)(double, double)) {
  Shape so = broadcast_shape("ref", a.shape(), b.shape());
  Tensor out = empty64(so);
  int64_t rank = so.size(), n = out.numel();
  for (int64_t i = 0; i < n; ++i) {
    int64_t rem = i, ia = 0, ib = 0, sa = 1, sb = 1;
    for (int64_t d = rank - 1; d >= 0; --d) {
      int64_t idx = rem % so[d];
      rem /= so[d];
      int64_t da = d - (rank - a.dim()), db = d - (rank - b.dim());
      if (da >= 0) { ia += (a.shape()[da] == 1 ? 0 : idx) * sa; sa *= a.shape()[da]; }
      if (db >= 0) { ib += (b.shape()[db] == 1 ? 0 : idx) * sb; sb *= b.shape()[db]; }
    }
    md(out)[i] = f(cd(a)[ia], cd(b)[ib]);
  }
  return out;
}

Tensor ref_unary(const Tensor& a, const std::function<double(double)>& f) {
  Tensor out = empty64(a.shape());
  for (int64_t i = 0; i < a.numel(); ++i) md(out)[i] = f(cd(a)[i]);
  return out;
}

const std::vector<std::vector<Shape>> kBinaryShapes = {
    {{3, 5}, {3, 5}}, {{2, 3, 7}, {7}}, {{4, 1, 5}, {3, 1}}, {{1}, {6, 2}}, {{2, 3}, {}}};
const std::vector<std::vector<Shape>> kUnaryShapes = {{{7}}, {{3, 5, 2}}, {{}}};

OpCase binary_case(const char* op, Tensor (*fn)(const Tensor&, const Tensor&), double (*f)(double, double)) {
  OpCase c;
  c.op = op;
  c.shapes = kBinaryShapes;
  c.run = [fn](const Inputs& in) { return fn(in[0], in[1]); };
  c.reference = [f](const Inputs& in) { return ref_binary(in[0], in[1], f); };
  return c;
}

// Inputs kept in [lo, hi] for ops defined only there (log, sqrt, division).
std::function<Inputs(const std::vector<Shape>&, uint64_t, DType)> uniform_inputs(double lo, double hi) {
  return [lo, hi](const std::vector<Shape>& shapes, uint64_t seed, DType dt) {
    Inputs in;
    for (size_t i = 0; i < shapes.size(); ++i) in.push_back(rand_uniform(shapes[i], seed * 7 + i, lo, hi, dt));
    return in;
  };
}

OpCase unary_case(const char* op, std::function<Tensor(const Tensor&)> fn, std::function<double(double)> f,
                  double lo = 0, double hi = 0) {
  OpCase c;
  c.op = op;
  c.shapes = kUnaryShapes;
  c.run = [fn](const Inputs& in) { return fn(in[0]); };
  c.reference = [f](const Inputs& in) { return ref_unary(in[0], f); };
  if (hi > lo) c.make_inputs = uniform_inputs(lo, hi);
  return c;
}

double sig(double x) { return 1 / (1 + std::exp(-x)); }

// bias_act(x [..., N], bias [N], act) = act(x + bias), one case per activation it takes. Shapes: one row; an odd
// N with batch dims; N = 37 (vector body and scalar tail); 130 rows, more than two of the kernels' 64-row chunks
// of bias sums.
std::vector<OpCase> bias_act_cases() {
  struct Act {
    const char* name;
    double (*f)(double);
  };
  const Act acts[] = {
      {"gelu", [](double z) { return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0))); }},
      {"quick_gelu", [](double z) { return z * sig(1.702 * z); }},
      {"silu", [](double z) { return z * sig(z); }},
      {"relu", [](double z) { return z > 0 ? z : 0.0; }},
      {"tanh", [](double z) { return std::tanh(z); }},
      {"sigmoid", sig},  // the derivative from the recomputed output, as tanh's
  };
  std::vector<OpCase> v;
  for (const Act& a : acts) {
    OpCase c;
    c.op = "bias_act";
    c.shapes = {{{7}, {7}}, {{3, 5, 3}, {3}}, {{2, 37}, {37}}, {{2, 65, 9}, {9}}};
    std::string name = a.name;
    c.run = [name](const Inputs& in) { return bias_act(in[0], in[1], name); };
    double (*f)(double) = a.f;
    c.reference = [f](const Inputs& in) {
      Tensor out = empty64(in[0].shape());
      int64_t N = in[1].numel();
      for (int64_t i = 0; i < out.numel(); ++i) md(out)[i] = f(cd(in[0])[i] + cd(in[1])[i % N]);
      return out;
    };
    v.push_back(c);
  }
  return v;
}

std::vector<OpCase> elementwise_cases() {
  std::vector<OpCase> v;
  v.push_back(binary_case("add", add, [](double x, double y) { return x + y; }));
  v.push_back(binary_case("sub", sub, [](double x, double y) { return x - y; }));
  v.push_back(binary_case("mul", mul, [](double x, double y) { return x * y; }));
  OpCase d = binary_case("div", div, [](double x, double y) { return x / y; });
  d.make_inputs = uniform_inputs(0.5, 2.0);
  v.push_back(d);
  v.push_back(unary_case("add_scalar", [](const Tensor& x) { return add_scalar(x, 0.7); }, [](double x) { return x + 0.7; }));
  v.push_back(unary_case("mul_scalar", [](const Tensor& x) { return mul_scalar(x, -1.3); }, [](double x) { return x * -1.3; }));
  v.push_back(unary_case("neg", neg, [](double x) { return -x; }));
  v.push_back(unary_case("exp", psa::exp, [](double x) { return std::exp(x); }));
  v.push_back(unary_case("log", psa::log, [](double x) { return std::log(x); }, 0.2, 3));
  v.push_back(unary_case("sqrt", psa::sqrt, [](double x) { return std::sqrt(x); }, 0.2, 3));
  v.push_back(unary_case("rsqrt", rsqrt, [](double x) { return 1 / std::sqrt(x); }, 0.2, 3));
  v.push_back(unary_case("pow_scalar", [](const Tensor& x) { return pow_scalar(x, 2.5); },
                         [](double x) { return std::pow(x, 2.5); }, 0.2, 3));
  // Negative bases with an integer exponent, and a negative exponent.
  v.push_back(unary_case("pow_scalar", [](const Tensor& x) { return pow_scalar(x, 3.0); },
                         [](double x) { return x * x * x; }));
  v.push_back(unary_case("pow_scalar", [](const Tensor& x) { return pow_scalar(x, -1.5); },
                         [](double x) { return 1 / (x * std::sqrt(x)); }, 0.2, 3));
  v.push_back(unary_case("tanh", psa::tanh, [](double x) { return std::tanh(x); }));
  v.push_back(unary_case("sigmoid", sigmoid, sig));
  v.push_back(unary_case("relu", relu, [](double x) { return x > 0 ? x : 0.0; }));
  v.push_back(unary_case("gelu", gelu, [](double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }));
  v.push_back(unary_case("quick_gelu", quick_gelu, [](double x) { return x * sig(1.702 * x); }));
  v.push_back(unary_case("silu", silu, [](double x) { return x * sig(x); }));
  OpCase sw;
  sw.op = "swiglu";
  sw.shapes = {{{7}, {7}}, {{3, 5, 2}, {3, 5, 2}}, {{2, 37}, {2, 37}}};  // 37: vector body and scalar tail
  sw.run = [](const Inputs& in) { return swiglu(in[0], in[1]); };
  sw.reference = [](const Inputs& in) {
    return ref_binary(in[0], in[1], [](double g, double u) { return g * sig(g) * u; });
  };
  v.push_back(sw);
  for (OpCase& c : bias_act_cases()) v.push_back(c);
  return v;
}

// Reduce `a` over `dim` with f, on host data.
Tensor ref_reduce(const Tensor& a, int64_t dim, bool keepdim, bool take_max) {
  DimSplit sp = split_at(a.shape(), dim);
  Shape s = a.shape();
  if (keepdim) s[dim] = 1;
  else s.erase(s.begin() + dim);
  Tensor out = empty64(s);
  for (int64_t o = 0; o < sp.outer; ++o)
    for (int64_t j = 0; j < sp.inner; ++j) {
      double acc = take_max ? -INFINITY : 0;
      for (int64_t i = 0; i < sp.n; ++i) {
        double x = cd(a)[(o * sp.n + i) * sp.inner + j];
        acc = take_max ? std::max(acc, x) : acc + x;
      }
      md(out)[o * sp.inner + j] = acc;
    }
  return out;
}

std::vector<OpCase> reduce_cases() {
  std::vector<OpCase> v;
  for (auto [dim, keep] : std::vector<std::pair<int64_t, bool>>{{0, false}, {1, true}, {2, false}}) {
    OpCase c;
    c.op = "sum";
    // {2, 300, 5} over dim 1 reaches the CUDA chunked column sum (few outputs, many rows).
    c.shapes = {{{3, 4, 5}}, {{2, 7, 3}}, {{2, 300, 5}}};
    c.run = [dim = dim, keep = keep](const Inputs& in) { return sum(in[0], dim, keep); };
    c.reference = [dim = dim, keep = keep](const Inputs& in) { return ref_reduce(in[0], dim, keep, false); };
    v.push_back(c);
    OpCase m = c;
    m.op = "max";
    m.run = [dim = dim, keep = keep](const Inputs& in) { return max(in[0], dim, keep); };
    m.reference = [dim = dim, keep = keep](const Inputs& in) { return ref_reduce(in[0], dim, keep, true); };
    v.push_back(m);
  }
  OpCase all;
  all.op = "sum";
  all.shapes = {{{4, 3}}, {{}}};
  all.run = [](const Inputs& in) { return sum(in[0]); };
  all.reference = [](const Inputs& in) {
    Tensor out = empty64({});
    md(out)[0] = 0;
    for (int64_t i = 0; i < in[0].numel(); ++i) md(out)[0] += cd(in[0])[i];
    return out;
  };
  v.push_back(all);
  OpCase all_max = all;
  all_max.op = "max";
  all_max.shapes = {{{4, 3}}, {{}}, {{2, 3, 40}}};
  all_max.run = [](const Inputs& in) { return max(in[0]); };
  all_max.reference = [](const Inputs& in) {  // the first maximum, as the gradient goes to it
    Tensor out = empty64({});
    md(out)[0] = cd(in[0])[0];
    for (int64_t i = 1; i < in[0].numel(); ++i) md(out)[0] = std::max(md(out)[0], cd(in[0])[i]);
    return out;
  };
  v.push_back(all_max);
  return v;
}

// C = op(A)·op(B) per batch, with a 2-D operand shared by every batch.
Tensor ref_matmul(const Tensor& a, const Tensor& b, bool ta, bool tb) {
  int64_t M = ta ? a.size(-1) : a.size(-2), K = ta ? a.size(-2) : a.size(-1), N = tb ? b.size(-2) : b.size(-1);
  Shape batch = a.dim() > 2 ? Shape(a.shape().begin(), a.shape().end() - 2) : Shape(b.shape().begin(), b.shape().end() - 2);
  int64_t nb = shape_numel(batch);
  Shape os = batch;
  os.push_back(M);
  os.push_back(N);
  Tensor out = empty64(os);
  for (int64_t p = 0; p < nb; ++p) {
    const double* A = cd(a) + (a.dim() > 2 ? p * M * K : 0);
    const double* B = cd(b) + (b.dim() > 2 ? p * K * N : 0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += (ta ? A[k * M + i] : A[i * K + k]) * (tb ? B[j * K + k] : B[k * N + j]);
        md(out)[p * M * N + i * N + j] = s;
      }
  }
  return out;
}

std::vector<OpCase> matmul_cases() {
  struct Spec { Shape a, b; bool ta, tb; };
  std::vector<Spec> specs = {{{7, 5}, {5, 3}, false, false}, {{5, 7}, {5, 3}, true, false},
                             {{7, 5}, {3, 5}, false, true},  {{5, 7}, {3, 5}, true, true},
                             {{2, 3, 4, 5}, {2, 3, 5, 6}, false, false}, {{2, 7, 5}, {5, 3}, false, false},
                             {{2, 5, 7}, {3, 5}, true, true}, {{4, 5}, {3, 5, 6}, false, false},
                             {{2, 33, 17}, {2, 19, 17}, false, true}};
  std::vector<OpCase> v;
  for (const Spec& s : specs) {
    OpCase c;
    c.op = "matmul";
    c.shapes = {{s.a, s.b}};
    c.run = [s](const Inputs& in) { return matmul(in[0], in[1], s.ta, s.tb); };
    c.reference = [s](const Inputs& in) { return ref_matmul(in[0], in[1], s.ta, s.tb); };
    v.push_back(c);
  }
  return v;
}

Tensor ref_permute(const Tensor& a, const std::vector<int64_t>& perm) {
  Shape os;
  for (int64_t p : perm) os.push_back(a.size(p));
  Tensor out = empty64(os);
  int64_t rank = a.dim();
  std::vector<int64_t> idx(rank);
  for (int64_t i = 0; i < a.numel(); ++i) {
    int64_t rem = i;
    for (int64_t d = rank - 1; d >= 0; --d) { idx[d] = rem % a.size(d); rem /= a.size(d); }
    int64_t o = 0;
    for (int64_t d = 0; d < rank; ++d) o = o * os[d] + idx[perm[d]];
    md(out)[o] = cd(a)[i];
  }
  return out;
}

std::vector<OpCase> shape_cases() {
  std::vector<OpCase> v;
  OpCase r;
  r.op = "reshape";
  // [3, 4, 5] -> [5, 12] and [7, 3] -> [21, 1] (-1 inferred); the view is checked through a consumer. The
  // reference copies the values in order into a fresh tensor of the new shape.
  r.shapes = {{{3, 4, 5}}, {{7, 3}}};
  r.run = [](const Inputs& in) { return mul_scalar(reshape(in[0], in[0].dim() == 3 ? Shape{5, -1} : Shape{-1, 1}), 1.0); };
  r.reference = [](const Inputs& in) {
    Tensor o = empty64(in[0].dim() == 3 ? Shape{5, 12} : Shape{21, 1});
    for (int64_t i = 0; i < o.numel(); ++i) md(o)[i] = cd(in[0])[i];
    return o;
  };
  v.push_back(r);
  for (auto perm : std::vector<std::vector<int64_t>>{{2, 0, 1}, {1, 0}, {0, 2, 1, 3}}) {
    OpCase p;
    p.op = "permute";
    p.shapes = {{perm.size() == 2 ? Shape{5, 7} : perm.size() == 3 ? Shape{3, 4, 5} : Shape{2, 3, 4, 5}}};
    p.run = [perm](const Inputs& in) { return permute(in[0], perm); };
    p.reference = [perm](const Inputs& in) { return ref_permute(in[0], perm); };
    v.push_back(p);
  }
  OpCase cat;
  cat.op = "concat";
  cat.shapes = {{{2, 3, 4}, {2, 1, 4}, {2, 5, 4}}};
  cat.run = [](const Inputs& in) { return concat(in, 1); };
  cat.reference = [](const Inputs& in) {
    Tensor out = empty64({2, 9, 4});
    for (int64_t b = 0; b < 2; ++b) {
      int64_t at = 0;
      for (const Tensor& t : in)
        for (int64_t i = 0; i < t.size(1); ++i, ++at)
          for (int64_t j = 0; j < 4; ++j) md(out)[(b * 9 + at) * 4 + j] = cd(t)[(b * t.size(1) + i) * 4 + j];
    }
    return out;
  };
  v.push_back(cat);
  OpCase sl;
  sl.op = "slice";
  sl.shapes = {{{3, 7, 2}}};
  sl.run = [](const Inputs& in) { return slice(in[0], 1, 2, 5); };
  sl.reference = [](const Inputs& in) {
    Tensor out = empty64({3, 3, 2});
    for (int64_t a = 0; a < 3; ++a)
      for (int64_t i = 0; i < 3; ++i)
        for (int64_t j = 0; j < 2; ++j) md(out)[(a * 3 + i) * 2 + j] = cd(in[0])[(a * 7 + i + 2) * 2 + j];
    return out;
  };
  v.push_back(sl);
  OpCase ex;
  ex.op = "expand";
  ex.shapes = {{{3, 1}}, {{4}}};
  ex.run = [](const Inputs& in) { return expand(in[0], in[0].dim() == 2 ? Shape{2, 3, 4} : Shape{3, 4}); };
  ex.reference = [](const Inputs& in) {
    Shape to = in[0].dim() == 2 ? Shape{2, 3, 4} : Shape{3, 4};
    return ref_binary(in[0], Tensor::zeros(to, DType::f64), [](double x, double) { return x; });
  };
  v.push_back(ex);
  OpCase is;
  is.op = "index_select";
  // The first embeds a [2, 3] batch of ids (embedding keeps the ids' shape), the second selects along dim 1.
  is.shapes = {{{5, 3}, {2, 3}}, {{2, 4, 3}, {6}}};
  is.make_inputs = [](const std::vector<Shape>& s, uint64_t seed, DType dt) {
    Inputs in{randn(s[0], seed, dt)};
    in.push_back(Tensor::from(std::vector<int64_t>{3, 0, 3, 2, 1, 3}, s[1], DType::i64));
    return in;
  };
  is.differentiable = {true, false};
  is.run = [](const Inputs& in) { return in[0].dim() == 2 ? embedding(in[0], in[1]) : index_select(in[0], 1, in[1]); };
  is.reference = [](const Inputs& in) {
    const Tensor& a = in[0];
    const int64_t* idx = in[1].data<int64_t>();
    int64_t outer = a.dim() == 2 ? 1 : a.size(0), n = a.dim() == 2 ? a.size(0) : a.size(1), inner = a.size(-1);
    Tensor out = empty64(a.dim() == 2 ? Shape{2, 3, inner} : Shape{outer, 6, inner});
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t k = 0; k < 6; ++k)
        for (int64_t j = 0; j < inner; ++j) md(out)[(o * 6 + k) * inner + j] = cd(a)[(o * n + idx[k]) * inner + j];
    return out;
  };
  v.push_back(is);
  return v;
}

// Rearranges `parts` (each [outer, n_k, inner] around dim `d`) into one [outer, Σ n_k, inner] tensor.
Tensor ref_concat(const Inputs& parts, int64_t d) {
  Shape os = parts[0].shape();
  os[d] = 0;
  for (const Tensor& t : parts) os[d] += t.size(d);
  Tensor out = empty64(os);
  DimSplit sp = split_at(os, d);
  for (int64_t o = 0, at = 0; o < sp.outer; ++o)
    for (const Tensor& t : parts) {
      const int64_t block = t.size(d) * sp.inner;
      for (int64_t i = 0; i < block; ++i) md(out)[at++] = cd(t)[o * block + i];
    }
  return out;
}

// Rows [from, to) of dim d.
Tensor ref_slice(const Tensor& a, int64_t d, int64_t from, int64_t to) {
  Shape os = a.shape();
  os[d] = to - from;
  Tensor out = empty64(os);
  DimSplit sp = split_at(a.shape(), d);
  for (int64_t o = 0, at = 0; o < sp.outer; ++o)
    for (int64_t i = from; i < to; ++i)
      for (int64_t j = 0; j < sp.inner; ++j) md(out)[at++] = cd(a)[(o * sp.n + i) * sp.inner + j];
  return out;
}

// The composite ops (mean, transpose, split, linear on a vector, the "swish" name) and the other dims and index
// dtypes of the shape ops, each under the table row whose backward it records.
std::vector<OpCase> composite_cases() {
  std::vector<OpCase> v;
  for (int64_t dim : {0, 1, -1}) {
    OpCase m;
    m.op = "sum";
    m.shapes = {{{3, 4, 5}}};
    m.run = [dim](const Inputs& in) { return mean(in[0], dim, dim == 1); };
    m.reference = [dim](const Inputs& in) {
      Tensor out = ref_reduce(in[0], dim < 0 ? dim + 3 : dim, dim == 1, false);
      for (int64_t i = 0; i < out.numel(); ++i) md(out)[i] /= in[0].size(dim);
      return out;
    };
    v.push_back(m);
  }
  OpCase all;
  all.op = "sum";
  all.shapes = {{{4, 3}}};
  all.run = [](const Inputs& in) { return mean(in[0]); };
  all.reference = [](const Inputs& in) {
    Tensor out = empty64({});
    md(out)[0] = 0;
    for (int64_t i = 0; i < 12; ++i) md(out)[0] += cd(in[0])[i] / 12;
    return out;
  };
  v.push_back(all);
  OpCase tr;
  tr.op = "permute";
  tr.shapes = {{{2, 3, 4, 5}}};
  tr.run = [](const Inputs& in) { return transpose(in[0], 1, -1); };
  tr.reference = [](const Inputs& in) { return ref_permute(in[0], {0, 3, 2, 1}); };
  v.push_back(tr);
  for (int64_t dim : {0, -1}) {
    OpCase cat;
    cat.op = "concat";
    cat.shapes = dim == 0 ? std::vector<std::vector<Shape>>{{{2, 3}, {1, 3}, {4, 3}}}
                          : std::vector<std::vector<Shape>>{{{2, 3, 2}, {2, 3, 5}, {2, 3, 1}}};
    cat.run = [dim](const Inputs& in) { return concat(in, dim); };
    cat.reference = [dim](const Inputs& in) { return ref_concat(in, dim < 0 ? in[0].dim() + dim : dim); };
    v.push_back(cat);
    OpCase sl;
    sl.op = "slice";
    sl.shapes = {{{6, 4, 7}}};
    sl.run = [dim](const Inputs& in) { return slice(in[0], dim, 1, 4); };
    sl.reference = [dim](const Inputs& in) { return ref_slice(in[0], dim < 0 ? 2 : dim, 1, 4); };
    v.push_back(sl);
    // split: every piece, reassembled in another order, so each piece's offset and gradient are checked.
    OpCase sp;
    sp.op = "slice";
    sp.shapes = {{{6, 4, 7}}};
    sp.run = [dim](const Inputs& in) {
      std::vector<Tensor> p = split(in[0], dim == 0 ? std::vector<int64_t>{1, 3, 2} : std::vector<int64_t>{2, 4, 1}, dim);
      return concat({p[2], p[0], p[1]}, dim);
    };
    sp.reference = [dim](const Inputs& in) {
      const int64_t d = dim < 0 ? 2 : dim, n = in[0].size(d), a = dim == 0 ? 1 : 2, b = dim == 0 ? 4 : 6;
      return ref_concat({ref_slice(in[0], d, b, n), ref_slice(in[0], d, 0, a), ref_slice(in[0], d, a, b)}, d);
    };
    v.push_back(sp);
  }
  OpCase is;
  is.op = "index_select";
  is.shapes = {{{2, 4, 3}, {5}}};
  is.make_inputs = [](const std::vector<Shape>& s, uint64_t seed, DType dt) {
    return Inputs{randn(s[0], seed, dt), Tensor::from(std::vector<int32_t>{2, 2, 0, 3, 1}, {5}, DType::i32)};
  };
  is.differentiable = {true, false};
  is.run = [](const Inputs& in) { return index_select(in[0], 1, in[1]); };
  is.reference = [](const Inputs& in) {
    const int32_t idx[5] = {2, 2, 0, 3, 1};
    Tensor out = empty64({2, 5, 3});
    for (int64_t o = 0; o < 2; ++o)
      for (int64_t k = 0; k < 5; ++k)
        for (int64_t j = 0; j < 3; ++j) md(out)[(o * 5 + k) * 3 + j] = cd(in[0])[(o * 4 + idx[k]) * 3 + j];
    return out;
  };
  v.push_back(is);
  OpCase lin;
  lin.op = "matmul";
  lin.shapes = {{{5}, {3, 5}, {3}}};
  lin.run = [](const Inputs& in) { return linear(in[0], in[1], in[2]); };
  lin.reference = [](const Inputs& in) {
    Tensor out = empty64({3});
    for (int64_t o = 0; o < 3; ++o) {
      md(out)[o] = cd(in[2])[o];
      for (int64_t i = 0; i < 5; ++i) md(out)[o] += cd(in[1])[o * 5 + i] * cd(in[0])[i];
    }
    return out;
  };
  v.push_back(lin);
  // linear over batch dims, with and without a bias, and linear_act (bias_act after the product, or the bare
  // activation without a bias), against one f64 loop: y[r, o] = act(Σ_i x[r, i]·w[o, i] + b[o]).
  struct LinearCase {
    const char* act;  // "" = linear
    double (*f)(double);
  };
  for (LinearCase lc : {LinearCase{"", [](double z) { return z; }}, LinearCase{"quick_gelu", [](double z) { return z * sig(1.702 * z); }},
                        LinearCase{"silu", [](double z) { return z * sig(z); }}}) {
    OpCase c;
    c.op = *lc.act ? "bias_act" : "matmul";
    c.shapes = {{{2, 3, 5}, {4, 5}, {4}}, {{3, 7}, {6, 7}}};
    const std::string act = lc.act;
    c.run = [act](const Inputs& in) {
      Tensor b = in.size() > 2 ? in[2] : Tensor();
      return act.empty() ? linear(in[0], in[1], b) : linear_act(in[0], in[1], b, act);
    };
    double (*f)(double) = lc.f;
    c.reference = [f](const Inputs& in) {
      const int64_t O = in[1].size(0), I = in[1].size(1), rows = in[0].numel() / I;
      Shape shape = in[0].shape();
      shape.back() = O;
      Tensor out = empty64(shape);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < O; ++o) {
          double z = in.size() > 2 ? cd(in[2])[o] : 0.0;
          for (int64_t i = 0; i < I; ++i) z += cd(in[0])[r * I + i] * cd(in[1])[o * I + i];
          md(out)[r * O + o] = f(z);
        }
      return out;
    };
    v.push_back(c);
  }
  v.push_back(unary_case("silu", [](const Tensor& x) { return activation(x, "swish"); },
                         [](double x) { return x * sig(x); }));
  return v;
}

const bool registered = register_cases(elementwise_cases()) && register_cases(reduce_cases()) &&
                        register_cases(matmul_cases()) && register_cases(shape_cases()) &&
                        register_cases(composite_cases());

}  // namespace
}  // namespace psa::test
