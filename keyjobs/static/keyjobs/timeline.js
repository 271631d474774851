/* keyjobs timeline: one SVG bar per run, in lanes per runner thread or per key.
 *
 * The data comes from the page (json_script) and then from the timeline's
 * data endpoint while work waits or runs. Every text from the data is set
 * with textContent or as an attribute value, never through innerHTML.
 * No libraries: this file is the whole of it.
 */
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";
  var LABEL_WIDTH = 250;
  var AXIS_HEIGHT = 26;
  var ROW_HEIGHT = 14;
  var ROW_GAP = 3;
  var LANE_PADDING = 5;
  var MIN_SPAN = 200; // ms: the deepest zoom
  var IDLE_REFRESH = 15000; // ms between looks when nothing waits or runs
  var TICK_STEPS = [
    1e3, 2e3, 5e3, 10e3, 15e3, 30e3, 60e3, 120e3, 300e3, 600e3, 900e3, 1800e3,
    3600e3, 7200e3, 10800e3, 21600e3, 43200e3, 86400e3
  ];
  var MARKER_ROWS = { rerouted: 0, dropped: 1, reused: 2, debounced: 3, cancelled: 4, tick: 5 };
  var MARKER_TITLES = {
    rerouted: "parked (rerouted): its key was busy",
    dropped: "dropped by concurrency control",
    reused: "deduplicated: a duplicate delay() was merged into it",
    debounced: "debounced: a later delay() merged into it (its arguments, a later start)",
    cancelled: "cancelled before it ran",
    tick: "a schedule's tick: the invocation it created was due"
  };

  var config, data, root, tooltip, refreshStatus, truncatedNote;
  var lanesMode = "thread";
  var view = null; // [start, end] once the user zooms or pans; null follows the data's window
  var items = []; // what the current drawing shows, by index, for the tooltip
  var refreshTimer = null;
  var drag = null; // {x, range, width, moved} while the chart is dragged
  var lastDragMoved = false;

  function el(name, attributes, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attributes || {}).forEach(function (attribute) {
      node.setAttribute(attribute, attributes[attribute]);
    });
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function pad(number) {
    return (number < 10 ? "0" : "") + number;
  }

  function clock(ms, withSeconds) {
    var date = new Date(ms);
    var text = pad(date.getHours()) + ":" + pad(date.getMinutes());
    return withSeconds === false ? text : text + ":" + pad(date.getSeconds());
  }

  function duration(ms) {
    if (ms < 1000) {
      return ms + " ms";
    }
    if (ms < 60000) {
      return (ms / 1000).toFixed(2) + " s";
    }
    return Math.floor(ms / 60000) + " min " + Math.round((ms % 60000) / 1000) + " s";
  }

  function shortTask(name) {
    return name.slice(name.lastIndexOf(".") + 1);
  }

  function domain() {
    return view || fitted();
  }

  /* The part of the window that holds something, padded: a burst of a few seconds fills the chart. */
  function fitted() {
    var low = Infinity;
    var high = -Infinity;
    data.runs.forEach(function (run) {
      low = Math.min(low, runStart(run));
      high = Math.max(high, runEnd(run));
    });
    data.markers.forEach(function (marker) {
      low = Math.min(low, marker.at);
      high = Math.max(high, marker.at);
    });
    if (low === Infinity) {
      return [data.start, data.end];
    }
    if (data.active && data.follows_now) {
      high = data.now;
    }
    var padding = Math.max((high - low) * 0.04, 250);
    low = Math.max(data.start, low - padding);
    high = Math.min(data.end, high + padding);
    if (high - low < 2000) {
      high = Math.min(data.end, low + 2000);
      low = Math.max(data.start, high - 2000);
    }
    return [low, high];
  }

  function runStart(run) {
    return run.start === null ? data.start : run.start;
  }

  function runEnd(run) {
    return run.end === null ? data.now : run.end;
  }

  /* Lanes with their runs and markers; overlapping runs of one lane go to rows of their own. */
  function layout() {
    var lanes = [];
    var markerLane = null;
    if (lanesMode === "thread" && data.markers.length) {
      markerLane = { id: "markers", label: "concurrency control", runs: [], markers: [], rows: 0, raw_key: "" };
      lanes.push(markerLane);
    }
    var entries = data.lanes[lanesMode].map(function (lane) {
      var entry = {
        id: lane.id, label: lane.label, task: lane.task || "", raw_key: lane.raw_key || "", runs: [], markers: [],
        rows: 0
      };
      lanes.push(entry);
      return entry;
    });
    data.runs.forEach(function (run) {
      var lane = entries[lanesMode === "thread" ? run.thread_lane : run.key_lane];
      if (lane) {
        lane.runs.push(run);
      }
    });
    data.markers.forEach(function (marker) {
      var lane = markerLane || entries[marker.key_lane];
      if (lane) {
        lane.markers.push(marker);
      }
    });
    lanes.forEach(function (lane) {
      var ends = [];
      var markerRows = 0;
      if (lane === markerLane) {
        var kinds = {};
        lane.markers.forEach(function (marker) { kinds[marker.kind] = true; });
        var used = Object.keys(MARKER_ROWS).filter(function (kind) { return kinds[kind]; });
        lane.markerRow = {};
        used.forEach(function (kind, index) { lane.markerRow[kind] = index; });
        markerRows = used.length;
      } else if (lane.markers.length) {
        markerRows = 1;
      }
      lane.runs.sort(function (a, b) { return runStart(a) - runStart(b) || a.id - b.id; });
      lane.runs.forEach(function (run) {
        var row = 0;
        while (row < ends.length && ends[row] > runStart(run)) {
          row += 1;
        }
        ends[row] = runEnd(run);
        run.row = markerRows + row;
      });
      lane.markerRows = markerRows;
      lane.rows = Math.max(1, markerRows + ends.length);
    });
    return lanes;
  }

  function ticks(start, end, width) {
    var wanted = Math.max(2, Math.floor(width / 110));
    var span = end - start;
    var step = TICK_STEPS[TICK_STEPS.length - 1];
    for (var i = 0; i < TICK_STEPS.length; i += 1) {
      if (span / TICK_STEPS[i] <= wanted) {
        step = TICK_STEPS[i];
        break;
      }
    }
    // Align ticks to the local clock (the offset matters for steps of an hour and more).
    var offset = new Date(start).getTimezoneOffset() * 60000;
    var first = Math.ceil((start - offset) / step) * step + offset;
    var result = [];
    for (var t = first; t <= end; t += step) {
      result.push(t);
    }
    return { values: result, step: step };
  }

  function render() {
    var width = Math.max(root.clientWidth, 640);
    var chartWidth = width - LABEL_WIDTH - 12;
    var range = domain();
    var start = range[0];
    var end = range[1];
    var scale = chartWidth / (end - start);
    var x = function (t) { return LABEL_WIDTH + (t - start) * scale; };
    var lanes = layout();
    var y = AXIS_HEIGHT;
    lanes.forEach(function (lane) {
      lane.y = y;
      lane.height = lane.rows * (ROW_HEIGHT + ROW_GAP) - ROW_GAP + 2 * LANE_PADDING;
      y += lane.height + 1;
    });
    var height = Math.max(y + 4, AXIS_HEIGHT + 50);
    items = [];

    var svg = el("svg", {
      width: width, height: height, "class": "kj-svg", "data-lanes": lanesMode,
      "data-start": Math.round(start), "data-end": Math.round(end)
    });
    var clipId = "kj-clip";
    var defs = el("defs");
    var clip = el("clipPath", { id: clipId });
    clip.appendChild(el("rect", { x: LABEL_WIDTH, y: 0, width: chartWidth, height: height }));
    defs.appendChild(clip);
    svg.appendChild(defs);

    // Lanes: a band and a label each.
    var laneGroup = el("g", { "class": "kj-lanes" });
    lanes.forEach(function (lane, index) {
      var group = el("g", { "class": "kj-lane", "data-lane": lane.id, "data-rows": lane.rows });
      if (index % 2 === 0) {
        group.appendChild(el("rect", { "class": "kj-lane-bg", x: 0, y: lane.y, width: width, height: lane.height }));
      }
      var text = lane.label.length > 38 ? lane.label.slice(0, 37) + "…" : lane.label;
      var label = el("g", { "class": "kj-lane-name" });
      label.appendChild(el("title", {}, lane.label));
      label.appendChild(el("text", { x: 6, y: lane.y + LANE_PADDING + ROW_HEIGHT - 3, "class": "kj-lane-label" }, text));
      if (lanesMode === "key" && lane.raw_key) {
        var link = el("a", {
          href: config.keyUrl + "?" + new URLSearchParams({ task: lane.task, key: lane.raw_key }).toString()
        });
        link.appendChild(label);
        group.appendChild(link);
      } else {
        group.appendChild(label);
      }
      laneGroup.appendChild(group);
    });
    svg.appendChild(laneGroup);

    // The time axis, with a grid line per tick.
    var axis = el("g", { "class": "kj-axis" });
    var tickInfo = ticks(start, end, chartWidth);
    tickInfo.values.forEach(function (t) {
      axis.appendChild(el("line", { "class": "kj-grid", x1: x(t), x2: x(t), y1: AXIS_HEIGHT - 6, y2: height }));
      axis.appendChild(el("text", { x: x(t), y: 14, "text-anchor": "middle" }, clock(t, tickInfo.step < 60000)));
    });
    svg.appendChild(axis);

    // Bars.
    var bars = el("g", { "class": "kj-bars", "clip-path": "url(#" + clipId + ")" });
    lanes.forEach(function (lane) {
      lane.runs.forEach(function (run) {
        var began = runStart(run);
        var stop = runEnd(run);
        if (stop < start || began > end) {
          return;
        }
        var x0 = Math.max(x(began), LABEL_WIDTH - 2);
        var x1 = Math.min(x(stop), width);
        var link = el("a", { href: config.changeUrl.replace("__id__", String(run.id)) });
        var bar = el("rect", {
          "class": "kj-bar" + (run.end === null ? " kj-running" : ""),
          x: x0.toFixed(1), y: lane.y + LANE_PADDING + run.row * (ROW_HEIGHT + ROW_GAP),
          width: Math.max(2, x1 - x0).toFixed(1), height: ROW_HEIGHT, rx: 2,
          fill: config.statusColours[run.status] || "#444",
          "data-id": run.id, "data-lane": lane.id, "data-status": run.status, "data-row": run.row,
          "data-start": began, "data-end": run.end === null ? "" : run.end, "data-item": items.length
        });
        items.push({ type: "run", value: run });
        link.appendChild(bar);
        // Its paused stretches, on the bar itself: the run waited there on another invocation.
        (run.pauses || []).forEach(function (pause) {
          var p0 = Math.max(x(pause[0] === null ? began : pause[0]), x0);
          var p1 = Math.min(x(pause[1] === null ? stop : pause[1]), x1);
          if (p1 <= p0) {
            return;
          }
          link.appendChild(el("rect", {
            "class": "kj-paused", x: p0.toFixed(1), y: bar.getAttribute("y"), width: (p1 - p0).toFixed(1),
            height: ROW_HEIGHT, fill: config.statusColours.PAUSED || "#ccc", "data-id": run.id
          }));
        });
        bars.appendChild(link);
      });
    });
    svg.appendChild(bars);

    // Markers: a symbol each, in the lane's marker row.
    var markers = el("g", { "class": "kj-markers", "clip-path": "url(#" + clipId + ")" });
    lanes.forEach(function (lane) {
      lane.markers.forEach(function (marker) {
        if (marker.at < start || marker.at > end) {
          return;
        }
        var row = lane.markerRow ? lane.markerRow[marker.kind] : 0;
        var cx = x(marker.at);
        var cy = lane.y + LANE_PADDING + row * (ROW_HEIGHT + ROW_GAP) + ROW_HEIGHT / 2;
        var r = 5;
        var shape;
        if (marker.kind === "rerouted") {
          shape = "M" + (cx - r) + "," + (cy - r) + "L" + (cx + r) + "," + (cy - r) + "L" + cx + "," + (cy + r) + "Z";
        } else if (marker.kind === "cancelled") {
          shape = "M" + (cx - r) + "," + (cy - r) + "H" + (cx + r) + "V" + (cy + r) + "H" + (cx - r) + "Z";
        } else if (marker.kind === "dropped") {
          shape = "M" + (cx - r) + "," + (cy - r) + "L" + (cx + r) + "," + (cy + r) +
            "M" + (cx + r) + "," + (cy - r) + "L" + (cx - r) + "," + (cy + r);
        } else if (marker.kind === "tick") {
          shape = "M" + (cx - r) + "," + (cy + r) + "L" + (cx + r) + "," + (cy + r) + "L" + cx + "," + (cy - r) + "Z";
        } else {
          shape = "M" + cx + "," + (cy - r) + "L" + (cx + r) + "," + cy + "L" + cx + "," + (cy + r) + "L" + (cx - r) + "," + cy + "Z";
        }
        var colour = config.markerColours[marker.kind];
        var link = el("a", { href: config.changeUrl.replace("__id__", String(marker.id)) });
        link.appendChild(el("path", {
          d: shape, "class": "kj-marker kj-marker-" + marker.kind,
          fill: marker.kind === "dropped" ? "none" : colour, stroke: colour,
          "stroke-width": marker.kind === "dropped" ? 2.5 : 1,
          "data-id": marker.id, "data-kind": marker.kind, "data-lane": lane.id, "data-at": marker.at,
          "data-item": items.length
        }));
        items.push({ type: "marker", value: marker });
        markers.appendChild(link);
      });
    });
    svg.appendChild(markers);

    if (data.now >= start && data.now <= end) {
      svg.appendChild(el("line", { "class": "kj-now", x1: x(data.now), x2: x(data.now), y1: AXIS_HEIGHT - 6, y2: height }));
    }
    if (!data.runs.length && !data.markers.length) {
      svg.appendChild(el("text", { "class": "kj-empty", x: LABEL_WIDTH + 10, y: AXIS_HEIGHT + 24 },
        "Nothing ran in this window."));
    }
    root.replaceChildren(svg);
    root.dataset.runs = String(data.runs.length);
    root.dataset.markers = String(data.markers.length);
    root.dataset.lanes = lanesMode;
    attachPointer(svg, chartWidth);
  }

  /* Hover details, zoom with the wheel, pan by dragging (see startDragging), fit by double-click. */
  function attachPointer(svg, chartWidth) {
    svg.addEventListener("mousemove", function (event) {
      if (drag) {
        return;
      }
      var target = event.target.closest ? event.target.closest("[data-item]") : null;
      if (target) {
        showTooltip(items[Number(target.getAttribute("data-item"))], event);
      } else {
        tooltip.hidden = true;
      }
    });
    svg.addEventListener("mouseleave", function () {
      tooltip.hidden = true;
    });
    svg.addEventListener("mousedown", function (event) {
      if (event.button === 0 && event.clientX - svg.getBoundingClientRect().left > LABEL_WIDTH) {
        event.preventDefault();
        drag = { x: event.clientX, range: domain(), width: chartWidth, moved: false };
      }
    });
    svg.addEventListener("wheel", function (event) {
      var offset = event.clientX - svg.getBoundingClientRect().left - LABEL_WIDTH;
      if (offset < 0) {
        return;
      }
      event.preventDefault();
      zoom(event.deltaY < 0 ? 0.8 : 1.25, offset / chartWidth);
    }, { passive: false });
    svg.addEventListener("dblclick", function () {
      view = null;
      render();
    });
  }

  /* Dragging re-renders, which replaces the svg: the drag is followed on the window. */
  function startDragging() {
    window.addEventListener("mousemove", function (event) {
      if (!drag) {
        return;
      }
      var moved = event.clientX - drag.x;
      if (drag.moved || Math.abs(moved) > 3) {
        drag.moved = true;
        tooltip.hidden = true;
        var shift = moved / drag.width * (drag.range[1] - drag.range[0]);
        view = [drag.range[0] - shift, drag.range[1] - shift];
        render();
        root.firstChild.classList.add("kj-dragging");
      }
    });
    window.addEventListener("mouseup", function () {
      drag = null;
      if (root.firstChild) {
        root.firstChild.classList.remove("kj-dragging");
      }
    });
    // The click that ends a drag over a bar must not open the bar.
    window.addEventListener("click", function (event) {
      if (lastDragMoved) {
        event.preventDefault();
        event.stopPropagation();
      }
      lastDragMoved = false;
    }, true);
    window.addEventListener("mousedown", function () {
      lastDragMoved = false;
    }, true);
    window.addEventListener("mouseup", function () {
      lastDragMoved = Boolean(drag && drag.moved);
    }, true);
  }

  function zoom(factor, at) {
    var range = domain();
    var span = range[1] - range[0];
    var newSpan = Math.max(MIN_SPAN, span * factor);
    var anchor = range[0] + span * (at === undefined ? 0.5 : at);
    var start = anchor - (anchor - range[0]) * (newSpan / span);
    if (newSpan >= data.end - data.start) {
      view = [data.start, data.end];
    } else {
      view = [start, start + newSpan];
    }
    render();
  }

  function showTooltip(item, event) {
    if (!item) {
      tooltip.hidden = true;
      return;
    }
    var lines = [];
    var title;
    if (item.type === "run") {
      var run = item.value;
      var keyLane = data.lanes.key[run.key_lane];
      title = "#" + run.id + " " + shortTask(keyLane.task) + (keyLane.key ? " (" + keyLane.key + ")" : "");
      lines.push(config.statusLabels[run.status] || run.status);
      lines.push((run.start === null ? "started before the window" : "started " + clock(run.start)) +
        (run.end === null ? ", still running" : ", ended " + clock(run.end)));
      if (run.start !== null) {
        lines.push((run.end === null ? "running for " : "took ") + duration(runEnd(run) - run.start));
      }
      if (run.pauses && run.pauses.length) {
        var pausedFor = run.pauses.reduce(function (sum, pause) {
          return sum + ((pause[1] === null ? runEnd(run) : pause[1]) - (pause[0] === null ? runStart(run) : pause[0]));
        }, 0);
        lines.push("paused " + run.pauses.length + " time(s), " + duration(pausedFor) + " in all, waiting on other work");
      }
      if (run.parent !== null && run.parent !== undefined) {
        lines.push("delayed by #" + run.parent);
      }
      lines.push(data.lanes.thread[run.thread_lane].label);
      lines.push(keyLane.task);
    } else {
      var marker = item.value;
      var markerLane = data.lanes.key[marker.key_lane];
      title = "#" + marker.id + " " + shortTask(markerLane.task) + (markerLane.key ? " (" + markerLane.key + ")" : "");
      lines.push(MARKER_TITLES[marker.kind]);
      lines.push("at " + clock(marker.at));
    }
    tooltip.replaceChildren();
    var strong = document.createElement("strong");
    strong.textContent = title;
    tooltip.appendChild(strong);
    tooltip.appendChild(document.createTextNode(lines.join("\n")));
    tooltip.hidden = false;
    var left = Math.min(event.clientX + 14, window.innerWidth - tooltip.offsetWidth - 8);
    var top = event.clientY + 14;
    if (top + tooltip.offsetHeight > window.innerHeight) {
      top = event.clientY - tooltip.offsetHeight - 10;
    }
    tooltip.style.left = left + "px";
    tooltip.style.top = top + "px";
  }

  function setLanes(mode) {
    lanesMode = mode === "key" ? "key" : "thread";
    ["thread", "key"].forEach(function (name) {
      document.getElementById("kj-lanes-" + name).setAttribute("aria-pressed", String(name === lanesMode));
    });
    var input = document.getElementById("kj-lanes-input");
    if (input) {
      input.value = lanesMode;
    }
    var url = new URL(window.location.href);
    url.searchParams.set("lanes", lanesMode);
    window.history.replaceState(null, "", url.toString());
    describe();
    render();
  }

  function describe() {
    var text = data.runs.length + " run(s), " + data.markers.length + " marker(s), " +
      data.lanes[lanesMode].length + " lane(s) · updated " + clock(data.now);
    if (data.active) {
      text += " · work is waiting or running: refreshing every " + config.refreshMs / 1000 + " s";
    } else if (data.follows_now) {
      text += " · idle";
    }
    refreshStatus.textContent = text;
    truncatedNote.hidden = !data.truncated;
    truncatedNote.textContent = data.truncated
      ? "This window holds more than " + data.limit + " events: only the most recent " + data.limit +
        " are shown. Choose a shorter window to see all of it."
      : "";
  }

  function scheduleRefresh() {
    window.clearTimeout(refreshTimer);
    if (data.active) {
      refreshTimer = window.setTimeout(refresh, config.refreshMs);
    } else if (data.follows_now) {
      refreshTimer = window.setTimeout(refresh, IDLE_REFRESH);
    }
  }

  function refresh() {
    var url = config.dataUrl + "?" + new URLSearchParams(config.query).toString();
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error(response.status + " " + response.statusText);
        }
        return response.json();
      })
      .then(function (fresh) {
        data = fresh;
        describe();
        render();
        scheduleRefresh();
      })
      .catch(function (error) {
        refreshStatus.textContent = "could not refresh (" + error.message + "); trying again";
        refreshTimer = window.setTimeout(refresh, IDLE_REFRESH);
      });
  }

  function start() {
    config = JSON.parse(document.getElementById("kj-timeline-config").textContent);
    data = JSON.parse(document.getElementById("kj-timeline-data").textContent);
    root = document.getElementById("kj-timeline");
    tooltip = document.getElementById("kj-tooltip");
    refreshStatus = document.getElementById("kj-refresh-status");
    truncatedNote = document.getElementById("kj-truncated");
    document.getElementById("kj-lanes-thread").addEventListener("click", function () { setLanes("thread"); });
    document.getElementById("kj-lanes-key").addEventListener("click", function () { setLanes("key"); });
    document.getElementById("kj-zoom-in").addEventListener("click", function () { zoom(0.5); });
    document.getElementById("kj-zoom-out").addEventListener("click", function () { zoom(2); });
    document.getElementById("kj-zoom-fit").addEventListener("click", function () { view = null; render(); });
    document.getElementById("kj-zoom-window").addEventListener("click", function () {
      view = [data.start, data.end];
      render();
    });
    root.addEventListener("keydown", function (event) {
      if (event.key === "+" || event.key === "=") { zoom(0.5); }
      if (event.key === "-") { zoom(2); }
      if (event.key === "0") { view = null; render(); }
    });
    startDragging();
    var resizeTimer = null;
    window.addEventListener("resize", function () {
      window.clearTimeout(resizeTimer);
      resizeTimer = window.setTimeout(render, 100);
    });
    setLanes(config.lanes);
    scheduleRefresh();
    document.body.dataset.timelineReady = "true";
  }

  document.addEventListener("DOMContentLoaded", start);
})();
