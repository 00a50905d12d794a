// Containers that report allocation failure instead of throwing.
//
// The engine is built without exceptions, so the std containers would turn
// memory exhaustion into std::terminate. kloop.h promises -ENOMEM instead:
// every growth here returns false on failure and leaves the container as it
// was. Element types are trivially copyable (pointers, ids, records).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace kl {

// A growable array.
template <typename T>
class Vec {
  static_assert(std::is_trivially_copyable_v<T>);

 public:
  Vec() = default;
  Vec(const Vec &) = delete;
  Vec &operator=(const Vec &) = delete;
  ~Vec() { free(data_); }

  bool reserve(size_t n) {
    if (n <= cap_) return true;
    size_t cap = cap_ ? cap_ : 8;
    while (cap < n) cap *= 2;
    // T may itself be a pointer type: sizeof(T) is meant.
    T *d = static_cast<T *>(realloc(data_, cap * sizeof(T)));  // NOLINT(bugprone-sizeof-expression)
    if (!d) return false;
    data_ = d;
    cap_ = cap;
    return true;
  }
  bool push_back(const T &v) {
    if (size_ == cap_ && !reserve(size_ + 1)) return false;
    data_[size_++] = v;
    return true;
  }
  void pop_back() { --size_; }
  void clear() { size_ = 0; }
  void swap(Vec &o) {
    T *d = data_;
    size_t s = size_;
    size_t c = cap_;
    data_ = o.data_;
    size_ = o.size_;
    cap_ = o.cap_;
    o.data_ = d;
    o.size_ = s;
    o.cap_ = c;
  }
  // Remove element i by moving the last one into its place.
  void swap_remove(size_t i) {
    data_[i] = data_[size_ - 1];
    --size_;
  }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  T &operator[](size_t i) { return data_[i]; }
  const T &operator[](size_t i) const { return data_[i]; }
  T &back() { return data_[size_ - 1]; }
  T *begin() { return data_; }
  T *end() { return data_ + size_; }
  const T *begin() const { return data_; }
  const T *end() const { return data_ + size_; }

 private:
  T *data_ = nullptr;
  size_t size_ = 0, cap_ = 0;
};

// A FIFO ring (power-of-two capacity).
template <typename T>
class Fifo {
  static_assert(std::is_trivially_copyable_v<T>);

 public:
  Fifo() = default;
  Fifo(const Fifo &) = delete;
  Fifo &operator=(const Fifo &) = delete;
  ~Fifo() { free(data_); }

  bool reserve(size_t n) {
    if (n <= cap_) return true;
    size_t cap = cap_ ? cap_ : 16;
    while (cap < n) cap *= 2;
    T *d = static_cast<T *>(malloc(cap * sizeof(T)));
    if (!d) return false;
    for (size_t i = 0; i < size_; ++i) d[i] = at(i);
    free(data_);
    data_ = d;
    cap_ = cap;
    head_ = 0;
    return true;
  }
  bool push_back(const T &v) {
    if (size_ == cap_ && !reserve(size_ + 1)) return false;
    data_[(head_ + size_) & (cap_ - 1)] = v;
    ++size_;
    return true;
  }
  T &front() { return data_[head_]; }
  void pop_front() {
    head_ = (head_ + 1) & (cap_ - 1);
    --size_;
  }
  void clear() {
    head_ = 0;
    size_ = 0;
  }
  // Empty it and give its storage back.
  void release() {
    free(data_);
    data_ = nullptr;
    head_ = size_ = cap_ = 0;
  }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  T &at(size_t i) { return data_[(head_ + i) & (cap_ - 1)]; }
  const T &at(size_t i) const { return data_[(head_ + i) & (cap_ - 1)]; }
  // Keep the elements for which keep(e) is true, in order; hand the others
  // to out(e). Never allocates.
  template <typename Keep, typename Out>
  void partition(Keep keep, Out out) {
    size_t w = 0;
    for (size_t r = 0; r < size_; ++r) {
      T e = at(r);
      if (keep(e)) {
        at(w++) = e;
      } else {
        out(e);
      }
    }
    size_ = w;
  }

 private:
  T *data_ = nullptr;
  size_t head_ = 0, size_ = 0, cap_ = 0;
};

// Open-addressing hash map from an integer key to a trivially copyable
// value, with backward-shift deletion (no tombstones).
template <typename K, typename V>
class IntMap {
  static_assert(std::is_integral_v<K> && std::is_trivially_copyable_v<V>);

  struct Slot {
    K key;
    V val;
    bool used;
  };

 public:
  IntMap() = default;
  IntMap(const IntMap &) = delete;
  IntMap &operator=(const IntMap &) = delete;
  ~IntMap() { free(slots_); }

  V *find(K key) {
    if (!size_) return nullptr;
    for (size_t i = index(key);; i = (i + 1) & mask_) {
      Slot &s = slots_[i];
      if (!s.used) return nullptr;
      if (s.key == key) return &s.val;
    }
  }
  const V *find(K key) const { return const_cast<IntMap *>(this)->find(key); }
  bool contains(K key) const { return find(key) != nullptr; }

  // Insert or overwrite. False only when growing failed.
  bool put(K key, const V &val) {
    if (V *v = find(key)) {
      *v = val;
      return true;
    }
    if ((size_ + 1) * 4 > cap() * 3 && !grow()) return false;
    insert_new(key, val);
    return true;
  }
  bool erase(K key) {
    if (!size_) return false;
    size_t i = index(key);
    for (;; i = (i + 1) & mask_) {
      if (!slots_[i].used) return false;
      if (slots_[i].key == key) break;
    }
    // Shift later members of the probe run back into the hole.
    size_t hole = i;
    for (size_t j = (i + 1) & mask_; slots_[j].used; j = (j + 1) & mask_) {
      size_t home = index(slots_[j].key);
      bool movable = hole <= j ? (home <= hole || home > j) : (home <= hole && home > j);
      if (movable) {
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole].used = false;
    --size_;
    return true;
  }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  template <typename F>
  void for_each(F f) {
    for (size_t i = 0; i < cap(); ++i)
      if (slots_[i].used) f(slots_[i].key, slots_[i].val);
  }
  void clear() {
    if (slots_) memset(slots_, 0, cap() * sizeof(Slot));
    size_ = 0;
  }

 private:
  size_t cap() const { return slots_ ? mask_ + 1 : 0; }
  size_t index(K key) const {
    uint64_t h = static_cast<uint64_t>(key) * UINT64_C(0x9e3779b97f4a7c15);
    return static_cast<size_t>(h >> 32) & mask_;
  }
  void insert_new(K key, const V &val) {
    size_t i = index(key);
    while (slots_[i].used) i = (i + 1) & mask_;
    slots_[i].key = key;
    slots_[i].val = val;
    slots_[i].used = true;
    ++size_;
  }
  bool grow() {
    size_t ncap = cap() ? cap() * 2 : 16;
    Slot *ns = static_cast<Slot *>(calloc(ncap, sizeof(Slot)));
    if (!ns) return false;
    Slot *old = slots_;
    size_t ocap = cap();
    slots_ = ns;
    mask_ = ncap - 1;
    size_ = 0;
    for (size_t i = 0; i < ocap; ++i)
      if (old[i].used) insert_new(old[i].key, old[i].val);
    free(old);
    return true;
  }

  Slot *slots_ = nullptr;
  size_t mask_ = 0;
  size_t size_ = 0;
};

}  // namespace kl
